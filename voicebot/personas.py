"""Personas: data files (``personas/*.toml``) that say who the agent is and how it sounds."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from voicebot.errors import ConfigError
from voicebot.reservations.rules import WEEKDAYS, RestaurantRules

_WEEKDAYS_JA = ("月", "火", "水", "木", "金", "土", "日")
MAX_ACKNOWLEDGEMENT_CHARS = 24
DEFAULT_ACKNOWLEDGE_AFTER_MS = 700
MIN_ACKNOWLEDGE_AFTER_MS = 100
MAX_ACKNOWLEDGE_AFTER_MS = 5000


class Sampling(BaseModel):
    """LLM sampling options passed to Ollama as ``options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    num_predict: int = Field(default=160, gt=0)
    """Upper bound on reply tokens: spoken replies should be short."""

    def as_options(self) -> dict[str, Any]:
        """The Ollama ``options`` mapping."""
        return self.model_dump()


class Persona(BaseModel):
    """One persona file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    display_name: str
    language: Literal["en", "ja"]
    llm_model: str
    llm_backend: Literal["ollama", "openai"] | None = None
    """Protocol of the server that runs ``llm_model``; unset = VOICEBOT_LLM_BACKEND."""
    tts: Literal["piper", "kokoro-ja"] = "piper"
    tts_voice: str
    greeting: str
    apology: str
    """Said once when a stage fails mid-turn; the call goes on."""
    busy_message: str = ""
    """Said before hanging up when every line is taken."""
    goodbye: str = ""
    """Said when the call's time limit is reached."""
    system_prompt: str
    history_turns: int = Field(default=8, ge=0, le=100)
    """How many earlier turns the LLM sees."""
    sampling: Sampling = Field(default_factory=lambda: Sampling())
    backchannels: tuple[str, ...] = ()
    """Short acknowledgements (aizuchi) that must not stop the agent; empty = language default."""
    timezone: str | None = None
    """IANA time zone (e.g. Asia/Tokyo): today's date in the prompt, dates the tools resolve."""
    tools: tuple[str, ...] = ()
    """Tools the model may call (built-in names or ``voicebot.tools`` entry points)."""
    tool_filler: str = ""
    """Said when a tool takes a while ("One moment, I'll check.")."""
    tool_apology: str = ""
    """Said once when a tool fails or times out; empty = ``apology``."""
    restaurant: RestaurantRules | None = None
    """Booking rules for the reservation tools."""
    acknowledgement: str = ""
    """A word said at the end of the caller's turn when the answer is slow ("Sure,",
    「はい、」), synthesized once per process; empty = never. It plays only when the answer has
    no audio ``acknowledge_after_ms`` after the caller stopped speaking, and the answer
    follows it (see ``voicebot.acknowledgement``)."""
    acknowledge_after_ms: int = Field(
        default=DEFAULT_ACKNOWLEDGE_AFTER_MS,
        ge=MIN_ACKNOWLEDGE_AFTER_MS,
        le=MAX_ACKNOWLEDGE_AFTER_MS,
    )
    """How long after the caller's speech ends the answer may stay silent before the
    acknowledgement plays (never before the turn is closed and transcribed)."""

    @field_validator("acknowledgement")
    @classmethod
    def _acknowledgement(cls, value: str) -> str:
        value = value.strip()
        if value and not any(ch.isalnum() for ch in value):
            raise ValueError(
                f"{value!r} has nothing to say: use a word such as 'Sure,' or 'はい、'"
            )
        if len(value) > MAX_ACKNOWLEDGEMENT_CHARS:
            raise ValueError(
                f"{len(value)} characters is too long for an acknowledgement (at most "
                f"{MAX_ACKNOWLEDGEMENT_CHARS}): a word or two such as 'Sure,' or 'はい、'"
            )
        return value

    @field_validator("acknowledge_after_ms")
    @classmethod
    def _acknowledge_after(cls, value: int, info: ValidationInfo) -> int:
        # Only runs when the file sets it: a delay for nothing is a mistake worth naming.
        if not info.data.get("acknowledgement"):
            raise ValueError(
                'set without an acknowledgement: add acknowledgement = "Sure," (or '
                '"はい、"), or remove acknowledge_after_ms'
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as e:
                raise ValueError(f"unknown time zone {value!r} (e.g. Asia/Tokyo, UTC)") from e
        return value

    def system_prompt_at(self, now: datetime) -> str:
        """The system prompt with today's date in the persona's time zone (when it has one),
        so that the model can turn "next Saturday" into a date."""
        if self.timezone is None:
            return self.system_prompt
        local = now.astimezone(ZoneInfo(self.timezone))
        if self.language == "ja":
            today = (
                f"今日は{local.year}年{local.month}月{local.day}日"
                f"（{_WEEKDAYS_JA[local.weekday()]}曜日）、現在{local:%H:%M}です"
                f"（{local.date().isoformat()}）。"
            )
        else:
            today = (
                f"Today is {WEEKDAYS[local.weekday()]}, {local.date().isoformat()}; "
                f"the time is {local:%H:%M} ({self.timezone})."
            )
        return f"{self.system_prompt.rstrip()}\n\n{today}\n"


def load_persona(path: Path) -> Persona:
    """Read and validate one persona file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"persona file {path}: cannot read it ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"persona file {path}: invalid TOML: {e}") from e
    try:
        persona = Persona.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '?'}': {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"persona file {path}: {problems}") from e
    tool_problems = _tool_problems(persona)
    if tool_problems:
        raise ConfigError(f"persona file {path}: {'; '.join(tool_problems)}")
    if persona.name != path.stem:
        raise ConfigError(
            f"persona file {path}: field 'name': '{persona.name}' must match the file name "
            f"'{path.stem}'"
        )
    return persona


def _tool_problems(persona: Persona) -> list[str]:
    if not persona.tools:
        return []
    from voicebot.tools.registry import available_tools, check_tool_names

    registry = available_tools()
    problems = check_tool_names(persona.tools, registry)
    for name in persona.tools:
        tool = registry.get(name)
        for needed in tool.persona_fields if tool else ():
            if getattr(persona, needed) is None:
                problems.append(f"field '{needed}': required by the tool {name!r}")
    return list(dict.fromkeys(problems))


def load_personas(directory: Path) -> dict[str, Persona]:
    """All personas in a directory, by name; raises ConfigError if there are none."""
    if not directory.is_dir():
        raise ConfigError(
            f"personas directory {directory} does not exist: set VOICEBOT_PERSONAS_DIR"
        )
    personas = {p.name: p for p in map(load_persona, sorted(directory.glob("*.toml")))}
    if not personas:
        raise ConfigError(f"no persona files (*.toml) in {directory}")
    return personas
