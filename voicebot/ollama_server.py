"""A scripted server that speaks Ollama's HTTP API, for tests and ``voicebot bench``.

It streams NDJSON exactly as Ollama does (``/api/chat``, ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version``, ``/api/pull``), paced by an :class:`LlmProfile`, with replies
from a :class:`Script` and faults switchable at runtime through ``server.fault``:

``ok``                   normal replies
``down``                 the listener is closed (connection refused); switching back rebinds
``http_500``             ``/api/chat`` answers HTTP 500 with an Ollama-style error body
``slow``                 a late first token: ``ttft * slow_factor``, at least ``slow_min_s``
``error_midstream``      a few tokens, then an ``{"error": ...}`` line, as Ollama does on failure
``hang``                 ``/api/chat`` sends nothing at all until the client goes away
``disconnect_midstream`` a few tokens, then the connection is closed without finishing

Tool calls: a script may answer with a :class:`ScriptedReply` holding ``tool_calls``; when the
request offered ``tools``, they go out as Ollama sends them, in one chunk whose
``message.tool_calls`` is ``[{"function": {"name", "arguments": {...}}}]`` after the text and
before the ``done`` line. ``ConversationScript`` picks replies by the conversation so far (the
user's last words, or the tool result the request ends with); ``tool`` messages are accepted.

Built on ``http.server.ThreadingHTTPServer`` (one thread per connection, chunked transfer
encoding) so it needs no dependency and each stream can watch its own socket: a client
that closes its connection is noticed before the next token and recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from voicebot.scripted_http import (
    FAULTS,
    PROFILES,
    Disconnected,
    Fault,
    LlmProfile,
    ScriptedHandler,
    ScriptedServer,
)

logger = logging.getLogger(__name__)

OLLAMA_VERSION = "0.12.6"
DEFAULT_LISTED_MODELS = ("llama3.2:3b", "llama3.1:8b", "qwen2.5:7b")


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
# Latin words keep their leading whitespace (as BPE tokens do); CJK goes out two
# characters at a time, which is about what Japanese tokenizers produce.
_CJK_CLASS = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_TOKEN = re.compile(rf"\s*[{_CJK_CLASS}]{{1,2}}|\s*[^\s{_CJK_CLASS}]+|\s+")


def tokenize(text: str) -> list[str]:
    """Split text into pseudo-tokens: words with their leading spaces, 1–2 CJK characters."""
    return _TOKEN.findall(text)


def echo_reply(user_text: str) -> str:
    """The default scripted reply: a few sentences derived from the user's words."""
    text = user_text.strip()
    if _CJK.search(text):
        return f"かしこまりました。{text.rstrip('。')}ですね。ほかにご希望はありますか。"
    text = text.rstrip(".!?")
    return f"You said: {text}. That is an interesting point. Tell me more about it."


@dataclass(frozen=True)
class ScriptedToolCall:
    """A tool call the scripted model makes; ``arguments`` go out as given (any JSON)."""

    name: str
    arguments: Any = field(default_factory=dict)


@dataclass(frozen=True)
class ScriptedReply:
    """A scripted model turn: text (streamed token by token), then tool calls (if offered)."""

    text: str = ""
    tool_calls: tuple[ScriptedToolCall, ...] = ()


@dataclass(frozen=True)
class Rule:
    """When a ``ConversationScript`` gives ``reply``.

    user: the request ends with a user message containing this (case-insensitive).
    after_tool: the request ends with a ``tool`` message from this tool ...
    result_contains: ... whose content contains this (case-insensitive).
    A rule with neither ``user`` nor ``after_tool`` matches any request.
    """

    reply: ScriptedReply | str
    user: str | None = None
    after_tool: str | None = None
    result_contains: str | None = None

    def matches(self, messages: Sequence[Mapping[str, Any]]) -> bool:
        last = messages[-1] if messages else {}
        role = last.get("role")
        content = str(last.get("content") or "").lower()
        if self.user is not None:
            return role == "user" and self.user.lower() in content
        if self.after_tool is not None:
            return (
                role == "tool"
                and _tool_name_of(messages) == self.after_tool
                and (self.result_contains is None or self.result_contains.lower() in content)
            )
        return True


def _tool_name_of(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The tool a trailing ``tool`` message answers: its ``tool_name``, else the last call's."""
    last = messages[-1]
    if last.get("tool_name"):
        return str(last["tool_name"])
    for message in reversed(messages):
        calls = message.get("tool_calls") or []
        if message.get("role") == "assistant" and calls:
            function = calls[-1].get("function") or {}
            return str(function.get("name") or "") or None
    return None


class Script:
    """Reply policy: a fixed list of replies used in turn (cycled), else an echo of the user."""

    def __init__(self, replies: Sequence[str] | None = None) -> None:
        self._replies = list(replies or [])
        self._lock = threading.Lock()
        self._cycle = itertools.cycle(self._replies) if self._replies else None

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> str | ScriptedReply:
        """The reply to a chat request's messages."""
        if self._cycle is not None:
            with self._lock:
                return next(self._cycle)
        last_user = next(
            (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        return echo_reply(last_user)


class ConversationScript(Script):
    """Replies chosen by the conversation so far: the first matching ``Rule`` wins; without
    one, ``default`` (or an echo of the user when ``default`` is None)."""

    def __init__(self, rules: Sequence[Rule], default: ScriptedReply | str | None = None) -> None:
        super().__init__()
        self.rules = list(rules)
        self.default = default

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConversationScript:
        """A script from JSON (``--script FILE``)::

            {"rules": [{"user": "table", "text": "", "tool_calls":
                        [{"name": "check_availability", "arguments": {...}}]},
                       {"after_tool": "check_availability", "result_contains": "available",
                        "text": "We have a table."}],
             "default": "Sorry?"}

        Raises ValueError for anything else.
        """

        def reply(item: Mapping[str, Any]) -> ScriptedReply:
            calls = item.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ValueError("tool_calls must be a list")
            return ScriptedReply(
                str(item.get("text") or ""),
                tuple(ScriptedToolCall(str(c["name"]), c.get("arguments", {})) for c in calls),
            )

        try:
            rules = [
                Rule(
                    reply(item),
                    user=item.get("user"),
                    after_tool=item.get("after_tool"),
                    result_contains=item.get("result_contains"),
                )
                for item in data.get("rules") or []
            ]
            default = data.get("default")
            return cls(
                rules, default if default is None or isinstance(default, str) else reply(default)
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a conversation script: {e!r}") from e

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> str | ScriptedReply:
        for rule in self.rules:
            if rule.matches(messages):
                return rule.reply
        return self.default if self.default is not None else super().reply(messages)


@dataclass
class RecordedRequest:
    """One request the server received and, for chats, what it sent back."""

    method: str
    path: str
    body: dict[str, Any]
    model: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    stream: bool = True
    tools: list[dict[str, Any]] = field(default_factory=list)
    reply: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """The tool calls sent back (Ollama's wire form)."""
    tokens_planned: int = 0
    tokens_sent: int = 0
    client_disconnected: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


def normalize_model(name: str) -> str:
    """Ollama's default tag: ``llama3.2`` means ``llama3.2:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _details(name: str) -> dict[str, Any]:
    size = re.search(r"(\d+(?:\.\d+)?)b", name.lower())
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": f"{size.group(1)}B" if size else "3.2B",
        "quantization_level": "Q4_K_M",
    }


class OllamaProtocolServer(ScriptedServer["RecordedRequest"]):
    """An Ollama-compatible HTTP server on loopback, scripted and paced by a profile.

    ``models=None`` accepts any model name; a collection restricts the "pulled" models so
    others get Ollama's 404. ``requests`` lists the requests received, in order (the last
    ``max_recorded``). Faults other than ``down`` affect ``/api/chat`` only.
    """

    kind = "Ollama-protocol server"

    def __init__(
        self,
        profile: LlmProfile | str = "instant",
        *,
        script: Script | None = None,
        models: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fault: Fault = "ok",
        slow_factor: float = 10.0,
        slow_min_s: float = 2.0,
        fault_after_tokens: int = 3,
        load_s: float = 0.0,
        max_recorded: int = 10_000,
    ) -> None:
        self.script = script or Script()
        self.models: set[str] | None = (
            None if models is None else {normalize_model(m) for m in models}
        )
        self.fault_after_tokens = fault_after_tokens
        self.load_s = load_s
        self._loaded: dict[str, float] = {}
        super().__init__(
            profile,
            handler=_Handler,
            host=host,
            port=port,
            fault=fault,
            slow_factor=slow_factor,
            slow_min_s=slow_min_s,
            max_recorded=max_recorded,
        )

    def chat_requests(self) -> list[RecordedRequest]:
        """The recorded ``/api/chat`` requests, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == "/api/chat"]

    def _has_model(self, name: str) -> bool:
        with self._lock:
            return self.models is None or normalize_model(name) in self.models

    def _add_model(self, name: str) -> None:
        with self._lock:
            if self.models is not None:
                self.models.add(normalize_model(name))

    def _listed_models(self) -> list[str]:
        with self._lock:
            if self.models is not None:
                return sorted(self.models)
            seen = {normalize_model(r.model) for r in self.requests if r.model}
            return sorted(seen | set(DEFAULT_LISTED_MODELS))


class _Handler(ScriptedHandler):
    server_version = "ollama-protocol-server"

    @property
    def owner(self) -> OllamaProtocolServer:
        return cast(OllamaProtocolServer, self.server.owner)

    # -- routing ---------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self.read_json()
        except ValueError as e:
            self.send_json(400, {"error": f"invalid JSON body: {e}"})
            return
        model = body.get("model") or body.get("name")
        rec = RecordedRequest(method, path, body, model=str(model) if model else None)
        self.owner.record(rec)
        try:
            route = {
                ("GET", "/"): self._root,
                ("HEAD", "/"): self._root,
                ("GET", "/api/version"): self._version,
                ("GET", "/api/tags"): self._tags,
                ("GET", "/api/ps"): self._ps,
                ("POST", "/api/show"): self._show,
                ("POST", "/api/pull"): self._pull,
                ("POST", "/api/chat"): self._chat,
            }.get((method, path))
            if route is None:
                self.send_json(404, {"error": "404 page not found"})
            else:
                route(rec)
        except Disconnected:
            rec.client_disconnected = not self.owner.stopping
            self.close_connection = True
            logger.debug("client left during %s after %d tokens", path, rec.tokens_sent)
        finally:
            rec.finished.set()

    # -- simple routes ---------------------------------------------------------------------

    def _root(self, rec: RecordedRequest) -> None:
        self.send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _version(self, rec: RecordedRequest) -> None:
        self.send_json(200, {"version": OLLAMA_VERSION})

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": _now_rfc3339(),
            "size": 2_019_393_189,
            "digest": _digest(name),
            "details": _details(name),
        }

    def _tags(self, rec: RecordedRequest) -> None:
        models = [self._model_entry(n) for n in self.owner._listed_models()]
        self.send_json(200, {"models": models})

    def _ps(self, rec: RecordedRequest) -> None:
        now = time.time()
        with self.owner._lock:
            loaded = {n: t for n, t in self.owner._loaded.items() if t > now}
        models = []
        for name, until in sorted(loaded.items()):
            entry = self._model_entry(name)
            entry.pop("modified_at")
            expires = datetime.fromtimestamp(until, UTC)
            entry.update(
                expires_at=expires.isoformat().replace("+00:00", "Z"),
                size_vram=entry["size"],
                context_length=4096,
            )
            models.append(entry)
        self.send_json(200, {"models": models})

    def _show(self, rec: RecordedRequest) -> None:
        name = rec.model or ""
        if not self.owner._has_model(name):
            self.send_json(404, {"error": f"model '{name}' not found"})
            return
        self.send_json(
            200,
            {
                "modelfile": f"FROM {name}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": _details(name),
                "model_info": {"general.architecture": "llama"},
                "capabilities": ["completion", "tools"],
                "modified_at": _now_rfc3339(),
            },
        )

    def _pull(self, rec: RecordedRequest) -> None:
        name = rec.model or ""
        stream = rec.body.get("stream", True) is not False
        rec.stream = stream
        if not stream:
            self.owner._add_model(name)
            self.send_json(200, {"status": "success"})
            return
        digest = "sha256:" + _digest(name)
        total = 2_019_377_376
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        lines += [
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": c}
            for c in (0, total // 4, total // 2, 3 * total // 4, total)
        ]
        lines += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        self.start_stream("application/x-ndjson")
        for line in lines:
            self._send_line(line)
        self.owner._add_model(name)
        self.end_stream()

    # -- chat ------------------------------------------------------------------------------

    def _chat(self, rec: RecordedRequest) -> None:
        owner = self.owner
        body = rec.body
        name = rec.model or ""
        messages = body.get("messages") or []
        rec.messages = [dict(m) for m in messages if isinstance(m, Mapping)]
        rec.options = body.get("options")
        rec.keep_alive = body.get("keep_alive")
        rec.stream = body.get("stream", True) is not False
        rec.tools = [dict(t) for t in body.get("tools") or [] if isinstance(t, Mapping)]
        fault = owner.fault
        started = time.monotonic()

        if not name:
            self.send_json(400, {"error": "model is required"})
            return
        if not owner._has_model(name):
            self.send_json(404, {"error": f'model "{name}" not found, try pulling it first'})
            return
        if fault == "http_500":
            self.send_json(500, {"error": "llama runner process has terminated: exit status 2"})
            return
        if fault == "hang":
            self.wait(float("inf"))
            return

        self._mark_loaded(name, rec.keep_alive)
        if owner.load_s:
            self.wait(owner.load_s)
        if not rec.messages:
            # Ollama's documented way to load a model: empty messages, no generation.
            self.send_json(200, self._final(name, "load", started, 0, 0, 0.0))
            return

        scripted = owner.script.reply(rec.messages)
        if isinstance(scripted, str):
            scripted = ScriptedReply(scripted)
        # Like Ollama: a model only calls tools the request offered.
        if rec.tools:
            rec.tool_calls = [
                {"function": {"name": c.name, "arguments": c.arguments}}
                for c in scripted.tool_calls
            ]
        tokens = tokenize(scripted.text)
        num_predict = (rec.options or {}).get("num_predict")
        done_reason = "stop"
        if isinstance(num_predict, int) and 0 < num_predict < len(tokens):
            tokens, done_reason = tokens[:num_predict], "length"
        rec.reply = "".join(tokens)
        rec.tokens_planned = len(tokens)

        ttft = owner.first_token_delay(fault)
        interval = owner.token_interval()
        prompt_tokens = sum(len(tokenize(str(m.get("content") or ""))) for m in rec.messages)

        if not rec.stream:
            self.wait(ttft + interval * max(len(tokens) - 1, 0))
            final = self._final(name, done_reason, started, prompt_tokens, len(tokens), ttft)
            final["message"]["content"] = rec.reply
            if rec.tool_calls:
                final["message"]["tool_calls"] = rec.tool_calls
            rec.tokens_sent = len(tokens)
            self.send_json(200, final)
            return

        self.start_stream("application/x-ndjson")
        first_at = started + ttft
        for i, token in enumerate(tokens):
            if fault in ("error_midstream", "disconnect_midstream") and (
                i == owner.fault_after_tokens
            ):
                break
            self.wait(first_at + i * interval - time.monotonic())
            self._send_line(
                {
                    "model": name,
                    "created_at": _now_rfc3339(),
                    "message": {"role": "assistant", "content": token},
                    "done": False,
                }
            )
            rec.tokens_sent += 1
        else:
            if rec.tool_calls:
                self.wait(first_at + len(tokens) * interval - time.monotonic())
                self._send_line(
                    {
                        "model": name,
                        "created_at": _now_rfc3339(),
                        "message": {
                            "role": "assistant",
                            "content": "",
                            "tool_calls": rec.tool_calls,
                        },
                        "done": False,
                    }
                )
            self._send_line(
                self._final(name, done_reason, started, prompt_tokens, len(tokens), ttft)
            )
            self.end_stream()
            return
        if fault == "error_midstream":
            self._send_line({"error": "an error was encountered while running the model"})
            self.end_stream()
        else:
            # No terminating chunk: the client sees the body cut short, like a crashed runner.
            self.drop_connection()

    def _final(
        self,
        name: str,
        reason: str,
        started: float,
        prompt_tokens: int,
        eval_tokens: int,
        ttft_s: float,
    ) -> dict[str, Any]:
        total_ns = int((time.monotonic() - started) * 1e9)
        prompt_ns = int(ttft_s * 1e9)
        return {
            "model": name,
            "created_at": _now_rfc3339(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
            "total_duration": total_ns,
            "load_duration": int(self.owner.load_s * 1e9),
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt_ns,
            "eval_count": eval_tokens,
            "eval_duration": max(total_ns - prompt_ns, 0),
        }

    def _mark_loaded(self, name: str, keep_alive: str | float | None) -> None:
        seconds = _keep_alive_seconds(keep_alive)
        with self.owner._lock:
            if seconds == 0:
                self.owner._loaded.pop(normalize_model(name), None)
            else:
                until = time.time() + (seconds if seconds > 0 else 10 * 365 * 86400)
                self.owner._loaded[normalize_model(name)] = until

    def _send_line(self, obj: Mapping[str, Any]) -> None:
        self.send_chunk(json.dumps(obj, ensure_ascii=False).encode() + b"\n")


def _keep_alive_seconds(value: str | float | None) -> float:
    """Ollama's keep_alive: seconds, or a duration like "30m"; negative keeps forever."""
    if value is None:
        return 300.0
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
    if not match:
        return 300.0
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def serve(
    profile: LlmProfile | str = "gpu-8b",
    host: str = "127.0.0.1",
    port: int = 11434,
    script: Script | None = None,
) -> None:
    """Run the server in the foreground until interrupted."""
    OllamaProtocolServer(profile, host=host, port=port, script=script).serve_until_interrupted()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m voicebot.ollama_server --profile gpu-8b --port 11434``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu-8b")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument(
        "--script", help="JSON conversation script (see ConversationScript.from_json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    script = None
    if args.script:
        try:
            with open(args.script, encoding="utf-8") as f:
                script = ConversationScript.from_json(json.load(f))
        except (OSError, ValueError) as e:
            parser.error(f"--script {args.script}: {e}")
    serve(cast(str, args.profile), args.host, args.port, script)


__all__ = [
    "FAULTS",
    "PROFILES",
    "ConversationScript",
    "Fault",
    "LlmProfile",
    "OllamaProtocolServer",
    "RecordedRequest",
    "Rule",
    "Script",
    "ScriptedReply",
    "ScriptedToolCall",
    "echo_reply",
    "main",
    "serve",
    "tokenize",
]

if __name__ == "__main__":
    main()
