"""A scripted server that speaks the OpenAI chat-completions protocol, for tests.

It answers what vLLM, llama.cpp's ``llama-server``, LM Studio and a LiteLLM proxy answer:
``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed as server-sent events,
``data: {chunk}`` … ``data: [DONE]``, or one JSON body), paced by an
:class:`~voicebot.ollama_server.LlmProfile`. Replies come from a script: text, or tool
calls that are streamed the way OpenAI streams them (an ``id`` and ``name`` first, then the
JSON ``arguments`` in pieces, then ``finish_reason: "tool_calls"``). Faults switch at
runtime through ``server.fault``, with the same names as the Ollama-protocol server:

``ok``                   normal replies
``down``                 the listener is closed (connection refused); switching back rebinds
``http_500``             ``/v1/chat/completions`` answers HTTP 500 with an OpenAI-style error
``slow``                 a late first token: ``ttft * slow_factor``, at least ``slow_min_s``
``error_midstream``      a few chunks, then ``data: {"error": ...}``, as vLLM does on failure
``hang``                 the chat route sends nothing at all until the client goes away
``disconnect_midstream`` a few chunks, then the connection is closed without ``[DONE]``

Built on :mod:`voicebot.scripted_http`, like :mod:`voicebot.ollama_server`, so each
stream can watch its own socket and record a client that goes away.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from voicebot.ollama_server import Script, tokenize
from voicebot.scripted_http import (
    PROFILES,
    Disconnected,
    Fault,
    LlmProfile,
    ScriptedHandler,
    ScriptedServer,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScriptedToolCall:
    """A tool call the scripted model makes: a tool name and its arguments.

    ``arguments`` is sent as JSON text unless ``raw_arguments`` is given, which is sent as
    is (to script a model that writes broken JSON).
    """

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    raw_arguments: str | None = None

    def arguments_text(self) -> str:
        if self.raw_arguments is not None:
            return self.raw_arguments
        return json.dumps(dict(self.arguments), ensure_ascii=False)


Reply = str | Sequence[ScriptedToolCall]
"""What the scripted model answers: text, or the tool calls it makes."""


class ReplyScript(Protocol):
    """Reply policy: given the request's messages, the reply."""

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> Reply: ...


class TextScript:
    """The Ollama-protocol server's ``Script`` (fixed replies in turn, else an echo), as text."""

    def __init__(self, replies: Sequence[str] = ()) -> None:
        self._script = Script(replies)

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> Reply:
        answer = self._script.reply(messages)
        return answer if isinstance(answer, str) else answer.text


class ToolScript:
    """Calls ``calls`` when the last message is the user's; after the tools answered (the
    last message is a ``tool`` message), replies ``answer`` with each ``{tool_name}``
    replaced by that tool's result."""

    def __init__(self, calls: Sequence[ScriptedToolCall], answer: str) -> None:
        self.calls = tuple(calls)
        self.answer = answer

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> Reply:
        if not messages or messages[-1].get("role") != "tool":
            return self.calls
        results: dict[str, str] = {}
        ids = {
            str(call.get("id")): str((call.get("function") or {}).get("name"))
            for m in messages
            if m.get("role") == "assistant"
            for call in m.get("tool_calls") or ()
        }
        for m in messages:
            if m.get("role") == "tool":
                results[ids.get(str(m.get("tool_call_id")), "?")] = str(m.get("content"))
        text = self.answer
        for name, result in results.items():
            text = text.replace("{" + name + "}", result)
        return text


@dataclass
class RecordedRequest:
    """One request the server received and, for chats, what it sent back."""

    method: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    stream: bool = False
    reply: str = ""
    tool_calls: list[ScriptedToolCall] = field(default_factory=list)
    chunks_sent: int = 0
    client_disconnected: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


class OpenAIProtocolServer(ScriptedServer["RecordedRequest"]):
    """An OpenAI-compatible chat server on loopback, scripted and paced by a profile.

    ``models=None`` accepts any model name; a collection restricts the served models so
    others get a 404 like vLLM's. With ``api_key`` set, requests without
    ``Authorization: Bearer <api_key>`` get a 401. ``requests`` lists the requests received.
    """

    kind = "OpenAI-protocol server"

    def __init__(
        self,
        profile: LlmProfile | str = "instant",
        *,
        script: ReplyScript | None = None,
        models: Iterable[str] | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fault: Fault = "ok",
        slow_factor: float = 10.0,
        slow_min_s: float = 2.0,
        fault_after_chunks: int = 3,
        max_recorded: int = 10_000,
    ) -> None:
        self.script: ReplyScript = script or TextScript()
        self.models: set[str] | None = None if models is None else set(models)
        self.api_key = api_key
        self.fault_after_chunks = fault_after_chunks
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

    @property
    def base_url(self) -> str:
        """The ``base_url`` to give an OpenAI client: ``http://host:port/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def chat_requests(self) -> list[RecordedRequest]:
        """The recorded ``/v1/chat/completions`` requests, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/chat/completions"]

    def _served(self) -> list[str]:
        with self._lock:
            if self.models is not None:
                return sorted(self.models)
            return sorted({r.model for r in self.requests if r.model} or {"scripted"})


class _Handler(ScriptedHandler):
    server_version = "openai-protocol-server"

    @property
    def owner(self) -> OpenAIProtocolServer:
        return cast(OpenAIProtocolServer, self.server.owner)

    def dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self.read_json()
        except ValueError as e:
            self._send_error(400, f"invalid JSON body: {e}", "invalid_request_error")
            return
        model = body.get("model")
        rec = RecordedRequest(
            method,
            path,
            body,
            headers={k.lower(): v for k, v in self.headers.items()},
            model=str(model) if model else None,
        )
        self.owner.record(rec)
        try:
            if self.owner.api_key is not None and rec.headers.get("authorization") != (
                f"Bearer {self.owner.api_key}"
            ):
                self._send_error(401, "Incorrect API key provided.", "invalid_api_key")
                return
            route = {
                ("GET", "/v1/models"): self._models,
                ("POST", "/v1/chat/completions"): self._chat,
            }.get((method, path))
            if route is None:
                self._send_error(404, f"no route {method} {path}", "not_found")
            else:
                route(rec)
        except Disconnected:
            rec.client_disconnected = not self.owner.stopping
            self.close_connection = True
            logger.debug("client left during %s after %d chunks", path, rec.chunks_sent)
        finally:
            rec.finished.set()

    def _models(self, rec: RecordedRequest) -> None:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "voicebot-tests"}
            for name in self.owner._served()
        ]
        self.send_json(200, {"object": "list", "data": data})

    # -- chat ------------------------------------------------------------------------------

    def _chat(self, rec: RecordedRequest) -> None:
        owner = self.owner
        body = rec.body
        name = rec.model or ""
        rec.messages = [dict(m) for m in body.get("messages") or [] if isinstance(m, Mapping)]
        rec.tools = [dict(t) for t in body.get("tools") or [] if isinstance(t, Mapping)]
        rec.stream = body.get("stream") is True
        fault = owner.fault
        started = time.monotonic()

        if not name or not rec.messages:
            self._send_error(400, "model and messages are required", "invalid_request_error")
            return
        if owner.models is not None and name not in owner.models:
            self._send_error(404, f"The model `{name}` does not exist.", "NotFoundError")
            return
        if fault == "http_500":
            self._send_error(500, "EngineCore encountered an issue.", "InternalServerError")
            return
        if fault == "hang":
            self.wait(float("inf"))
            return

        reply = owner.script.reply(rec.messages)
        calls = [] if isinstance(reply, str) else list(reply)
        tokens = tokenize(reply) if isinstance(reply, str) else []
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "tool_calls" if calls else "stop"
        if not calls and isinstance(limit, int) and 0 < limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        rec.reply = "".join(tokens)
        rec.tool_calls = calls
        # Each call streams as a header chunk, then its arguments in pieces.
        pieces: list[dict[str, Any]] = [{"role": "assistant", "content": t} for t in tokens]
        for index, call in enumerate(calls):
            pieces.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": f"call_{uuid.uuid4().hex[:12]}",
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    ]
                }
            )
            text = call.arguments_text()
            pieces += [
                {"tool_calls": [{"index": index, "function": {"arguments": text[i : i + 8]}}]}
                for i in range(0, len(text), 8)
            ]

        ttft = owner.first_token_delay(fault)
        interval = owner.token_interval()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        usage = {
            "prompt_tokens": sum(len(tokenize(str(m.get("content") or ""))) for m in rec.messages),
            "completion_tokens": len(pieces),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

        if not rec.stream:
            self.wait(ttft + interval * max(len(pieces) - 1, 0))
            message: dict[str, Any] = {"role": "assistant", "content": rec.reply or None}
            if calls:
                message["tool_calls"] = _merged_calls(pieces)
            rec.chunks_sent = len(pieces)
            self.send_json(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                },
            )
            return

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }

        self.start_stream("text/event-stream")
        first_at = started + ttft
        for i, delta in enumerate(pieces):
            if fault in ("error_midstream", "disconnect_midstream") and (
                i == owner.fault_after_chunks
            ):
                break
            self.wait(first_at + i * interval - time.monotonic())
            self._send_event(chunk(delta))
            rec.chunks_sent += 1
        else:
            self._send_event(chunk({}, finish))
            options = body.get("stream_options") or {}
            if isinstance(options, Mapping) and options.get("include_usage"):
                self._send_event({**chunk({}), "choices": [], "usage": usage})
            self._send_data(b"[DONE]")
            self.end_stream()
            return
        if fault == "error_midstream":
            self._send_event(
                {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}}
            )
            self.end_stream()
        else:
            self.drop_connection()

    def _send_error(self, status: int, message: str, kind: str) -> None:
        self.send_json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _send_event(self, obj: Mapping[str, Any]) -> None:
        self._send_data(json.dumps(obj, ensure_ascii=False).encode())

    def _send_data(self, payload: bytes) -> None:
        self.send_chunk(b"data: " + payload + b"\n\n")


def _merged_calls(pieces: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The streamed tool-call pieces as the complete calls of a non-streamed reply."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        for part in piece.get("tool_calls") or ():
            call = calls.setdefault(
                part["index"], {"type": "function", "function": {"arguments": ""}}
            )
            if "id" in part:
                call["id"] = part["id"]
            function = part.get("function") or {}
            if "name" in function:
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def serve(
    profile: LlmProfile | str = "gpu-8b",
    host: str = "127.0.0.1",
    port: int = 8000,
    replies: Sequence[str] = (),
) -> None:
    """Run the server in the foreground until interrupted."""
    server = OpenAIProtocolServer(profile, script=TextScript(replies), host=host, port=port)
    server.serve_until_interrupted()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m voicebot.openai_server --profile gpu-8b --port 8000``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu-8b")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(str(args.profile), args.host, args.port)


__all__ = [
    "OpenAIProtocolServer",
    "RecordedRequest",
    "Reply",
    "ReplyScript",
    "ScriptedToolCall",
    "ToolScript",
    "main",
    "serve",
]

if __name__ == "__main__":
    main()
