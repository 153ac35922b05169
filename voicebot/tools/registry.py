"""The tools a persona may declare: built-ins, plus users' own through entry points.

A ``Tool`` is a name, a description for the model, a pydantic model of its arguments (its JSON
schema is what the model sees), a timeout and a callable ``run(context, arguments) -> str``.
The string is what the model is told: a refusal ("not booked: closed on 2026-12-31") is a normal
result; a tool raises only when it could not do its job (then the persona apologizes).

Users add tools with an entry point in the ``voicebot.tools`` group whose object is a ``Tool``
(or a list of them)::

    [project.entry-points."voicebot.tools"]
    weather = "my_package.tools:WEATHER"

A persona lists the tool names it uses (``tools = ["check_availability"]``); ``bind_tools``
gives one call the persona's tools with its ``ToolContext``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
from uuid import UUID
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from voicebot.conversation import utc_now
from voicebot.errors import ConfigError

if TYPE_CHECKING:
    from voicebot.personas import Persona
    from voicebot.reservations.book import ReservationBook

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "voicebot.tools"


@dataclass(frozen=True)
class ToolContext:
    """What a running tool may use besides its arguments.

    cancelled: set when the reply is cancelled or the tool timed out; a tool that writes
        checks it before committing, so a cancelled call stores nothing.
    clock: the current time (timezone-aware); ``now()`` gives it in the persona's time zone.
    """

    conversation_id: UUID
    persona: Persona
    clock: Callable[[], datetime] = utc_now
    cancelled: threading.Event = field(default_factory=threading.Event)
    reservations: ReservationBook | None = None

    def now(self) -> datetime:
        """The current time in the persona's time zone (UTC when it has none)."""
        return self.clock().astimezone(ZoneInfo(self.persona.timezone or "UTC"))


@dataclass(frozen=True)
class Tool:
    """One tool the model can call.

    persona_fields: persona fields the tool needs set (a persona declaring the tool without
        them is refused at load, naming the field).
    """

    name: str
    description: str
    arguments: type[BaseModel]
    run: Callable[[ToolContext, Any], str]
    timeout_s: float = 5.0
    persona_fields: tuple[str, ...] = ()

    def schema(self) -> dict[str, Any]:
        """The entry of Ollama's ``tools`` list for this tool."""
        schema = self.arguments.model_json_schema()
        properties: dict[str, Any] = {}
        for name, prop in (schema.get("properties") or {}).items():
            entry: dict[str, Any] = {"type": prop.get("type", "string")}
            description = str(prop.get("description") or "")
            if "default" in prop:
                description += f" (default: {prop['default']!r})"
            if description:
                entry["description"] = description.strip()
            if "enum" in prop:
                entry["enum"] = prop["enum"]
            properties[name] = entry
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": properties,
                    "required": list(schema.get("required") or []),
                },
            },
        }


def builtin_tools() -> dict[str, Tool]:
    """The tools that ship with voicebot, by name."""
    from voicebot.reservations.tools import RESERVATION_TOOLS

    return {tool.name: tool for tool in RESERVATION_TOOLS}


def _as_tools(value: object, source: str) -> list[Tool]:
    items: list[object] = list(value) if isinstance(value, list | tuple) else [value]
    if not items or not all(isinstance(t, Tool) for t in items):
        raise ConfigError(
            f"tool entry point {source}: expected a voicebot.tools.registry.Tool or a list of "
            f"them, got {type(value).__name__}"
        )
    return [t for t in items if isinstance(t, Tool)]


@cache
def available_tools() -> Mapping[str, Tool]:
    """Built-in tools and those of installed ``voicebot.tools`` entry points, by name.

    Raises ConfigError naming the entry point that cannot load or clashes with another tool.
    """
    tools = dict(builtin_tools())
    for point in entry_points(group=ENTRY_POINT_GROUP):
        source = f"{point.name} = {point.value}"
        try:
            loaded = point.load()
        except Exception as e:
            raise ConfigError(f"tool entry point {source} cannot be loaded: {e}") from e
        for tool in _as_tools(loaded, source):
            if tool.name in tools:
                raise ConfigError(
                    f"tool entry point {source}: a tool named {tool.name!r} already exists"
                )
            tools[tool.name] = tool
    return tools


@dataclass(frozen=True)
class Toolset:
    """One call's tools, bound to its context."""

    tools: Mapping[str, Tool]
    context: ToolContext

    def schemas(self) -> list[dict[str, Any]]:
        """Ollama's ``tools`` list."""
        return [tool.schema() for tool in self.tools.values()]

    def __bool__(self) -> bool:
        return bool(self.tools)


def bind_tools(
    persona: Persona,
    conversation_id: UUID,
    *,
    reservations: ReservationBook | None = None,
    clock: Callable[[], datetime] = utc_now,
    registry: Mapping[str, Tool] | None = None,
) -> Toolset:
    """The persona's declared tools for one call (empty when it declares none)."""
    if not persona.tools:  # no entry points to load for a persona without tools
        return Toolset({}, ToolContext(conversation_id, persona, clock=clock))
    known = available_tools() if registry is None else registry
    missing = [name for name in persona.tools if name not in known]
    if missing:
        raise ConfigError(f"persona {persona.name}: unknown tool(s) {', '.join(missing)}")
    context = ToolContext(conversation_id, persona, clock=clock, reservations=reservations)
    return Toolset({name: known[name] for name in persona.tools}, context)


def check_tool_names(names: Sequence[str], registry: Mapping[str, Tool]) -> list[str]:
    """Problems with a persona's ``tools`` list, one per bad entry (``tools[i]: ...``)."""
    problems = []
    for i, name in enumerate(names):
        if name not in registry:
            problems.append(
                f"field 'tools[{i}]': unknown tool {name!r}; available: "
                + ", ".join(sorted(registry))
            )
    return problems
