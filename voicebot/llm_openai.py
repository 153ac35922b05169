"""The chat stage over the OpenAI chat-completions protocol, through the official ``openai``
client with a ``base_url``: vLLM, llama.cpp's ``llama-server``, LM Studio or a LiteLLM proxy
serve the model.

``OpenAIChat`` is a ``ChatModel`` like ``voicebot.llm.OllamaChat``, with the same contract:
``stream(messages)`` yields content deltas, closing the generator cancels the request,
every failure during a turn becomes ``StageError("llm", ...)`` and start-up checks raise
``ConfigError`` saying how to fix it. ``stream_with_tools(messages, tools)`` also yields the
model's tool calls as ``ToolCallRequest``s, assembled from the streamed ``tool_calls``
deltas (an id and name first, then the JSON arguments in pieces).

Several LLM servers go behind one router (LiteLLM proxy, vLLM's router, HAProxy); this
module talks to one URL and does no balancing of its own.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import openai

from voicebot.conversation import Message
from voicebot.errors import ConfigError, StageError
from voicebot.llm import ToolCallRequest

logger = logging.getLogger(__name__)

STAGE = "llm"


class WireMessage(Protocol):
    """Any chat message: ``role`` and ``content``; an assistant message that asked for tools
    also has ``calls`` (``ToolCallRequest``s), a tool's answer has ``tool_name``."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def make_openai_client(
    base_url: str,
    *,
    api_key: str | None,
    timeout_s: float,
    connect_timeout_s: float = 3.0,
) -> openai.OpenAI:
    """An ``openai.OpenAI`` client for one OpenAI-compatible server.

    ``timeout_s`` bounds each read (first token included); no retries, because a caller is
    waiting. ``api_key`` and ``base_url`` are always explicit, so the client never reads
    ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` from the environment.
    """
    return openai.OpenAI(
        base_url=base_url,
        api_key=api_key or "unused",  # local servers ignore it; the client insists on one
        timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
        max_retries=0,
    )


def openai_options(sampling: Mapping[str, Any] | None) -> dict[str, Any]:
    """A persona's sampling options (Ollama names) as chat-completions parameters."""
    options: dict[str, Any] = {}
    for key, value in (sampling or {}).items():
        if key == "num_predict":
            options["max_tokens"] = value
        elif key in ("temperature", "top_p", "seed", "stop", "presence_penalty"):
            options[key] = value
        else:  # top_k, repeat_penalty, ...: vLLM and llama-server read them from the body
            options.setdefault("extra_body", {})[key] = value
    return options


def _base_url(client: openai.OpenAI) -> str:
    return str(client.base_url).rstrip("/")


def _read_timeout(client: openai.OpenAI) -> float | None:
    timeout = client.timeout
    if isinstance(timeout, int | float):
        return float(timeout)
    read = getattr(timeout, "read", None)
    return float(read) if isinstance(read, int | float) else None


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _status_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return e.message


def _describe(e: BaseException, client: openai.OpenAI, model: str, replying: bool) -> str:
    """A one-line, user-facing explanation of a failed chat request."""
    url = _base_url(client)
    if isinstance(e, openai.APIStatusError):
        message = _status_message(e)
        if e.status_code == 404 and "model" in message.lower():
            return f"model {model} is not served at {url}: {message}"
        if e.status_code in (401, 403):
            return (
                f"LLM server at {url} refused the API key (HTTP {e.status_code}): "
                "set VOICEBOT_OPENAI_API_KEY"
            )
        return f"LLM server at {url} answered HTTP {e.status_code}: {message}"
    if isinstance(e, openai.APITimeoutError | httpx.TimeoutException):
        if any("ConnectTimeout" in type(c).__name__ for c in _causes(e)):
            return f"LLM server unreachable at {url} (connect timed out)"
        timeout = _read_timeout(client)
        within = f" within {timeout:g} s" if timeout is not None else ""
        return f"LLM server at {url} sent nothing{within}; giving up"
    if isinstance(e, openai.APIConnectionError | httpx.TransportError | ConnectionError):
        if replying:
            return f"connection to LLM server at {url} dropped mid-reply"
        if any(isinstance(c, ConnectionRefusedError) for c in _causes(e)):
            return f"LLM server unreachable at {url} (connection refused)"
        return f"LLM server unreachable at {url} ({e})"
    if isinstance(e, openai.APIResponseValidationError | ValueError):
        return f"unexpected reply from LLM server at {url}: {e}"
    if isinstance(e, openai.APIError):  # an {"error": ...} event inside a 200 stream
        return f"LLM server failed mid-reply: {e.message}"
    return f"LLM request to {url} failed: {e}"


def _transport_errors() -> tuple[type[BaseException], ...]:
    # Older openai clients let httpx's errors escape a stream; newer ones use httpx2 and wrap.
    errors: list[type[BaseException]] = [openai.OpenAIError, httpx.HTTPError, ConnectionError]
    try:
        import httpx2

        errors.append(httpx2.HTTPError)
    except ImportError:
        pass
    return (*errors, ValueError)


_FAILURES = _transport_errors()


@dataclass
class _PartialCall:
    """A tool call being assembled from streamed deltas."""

    id: str = ""
    name: str = ""
    arguments: str = ""


def _complete(partial: _PartialCall, model: str) -> ToolCallRequest:
    """A finished call; its arguments must be one JSON object."""
    text = partial.arguments.strip() or "{}"
    try:
        arguments = json.loads(text)
    except ValueError as e:
        raise StageError(
            STAGE,
            f"model {model} called tool {partial.name!r} with arguments that are not JSON: "
            f"{text[:80]!r}",
        ) from e
    if not isinstance(arguments, dict):
        raise StageError(
            STAGE,
            f"model {model} called tool {partial.name!r} with arguments that are not a JSON "
            f"object: {text[:80]!r}",
        )
    if not partial.name:
        raise StageError(STAGE, f"model {model} sent a tool call without a name")
    return ToolCallRequest(partial.name, arguments)


def wire_messages(messages: Sequence[WireMessage]) -> list[dict[str, Any]]:
    """Messages as the chat-completions API takes them.

    The protocol links each tool answer to its call by an id; our messages link them by
    order and tool name, so ids are made here (``call00000``, nine characters, which
    Mistral-family servers require) and each tool answer takes the oldest unanswered call
    of its tool.
    """
    out: list[dict[str, Any]] = []
    unanswered: dict[str, deque[str]] = defaultdict(deque)
    made = 0
    for message in messages:
        calls = getattr(message, "calls", None)
        if calls is not None:
            wire_calls = []
            for call in calls:
                call_id = f"call{made:05d}"
                made += 1
                unanswered[call.name].append(call_id)
                wire_calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": json.dumps(call.arguments, ensure_ascii=False),
                        },
                    }
                )
            out.append({"role": "assistant", "content": message.content, "tool_calls": wire_calls})
        elif message.role == "tool":
            name = str(getattr(message, "tool_name", ""))
            if not unanswered[name]:
                raise ValueError(f"a result of tool {name!r} follows no call of it")
            call_id = unanswered[name].popleft()
            out.append({"role": "tool", "tool_call_id": call_id, "content": message.content})
        else:
            out.append({"role": message.role, "content": message.content})
    return out


class OpenAIChat:
    """``ChatModel`` backed by an OpenAI-compatible chat-completions server.

    ``options`` (from ``openai_options``: temperature, top_p, max_tokens, ...) go with every
    request.
    """

    def __init__(
        self, client: openai.OpenAI, model: str, *, options: Mapping[str, Any] | None = None
    ) -> None:
        self.client = client
        self.name = model
        self.options = dict(options) if options else {}

    def stream(self, messages: Sequence[Message]) -> Generator[str, None, None]:
        """Yield the reply's content deltas as they arrive.

        Raises ``StageError("llm", ...)`` on any failure; closing the generator closes the
        HTTP stream, so the server sees the disconnect and stops generating.
        """
        events = self._chat(messages, ())
        try:
            for event in events:
                if isinstance(event, str):
                    yield event
        finally:
            events.close()

    def stream_with_tools(
        self, messages: Sequence[WireMessage], tools: Sequence[Mapping[str, Any]]
    ) -> Generator[str | ToolCallRequest, None, None]:
        """Like ``stream``, offering ``tools`` (``{"type": "function", "function": {...}}``,
        as for Ollama); the model's complete tool calls come out after its text."""
        return self._chat(messages, tools)

    def _chat(
        self, messages: Sequence[WireMessage], tools: Sequence[Mapping[str, Any]]
    ) -> Generator[str | ToolCallRequest, None, None]:
        stream: Any = None
        replying = False
        finished = False
        calls: dict[int, _PartialCall] = {}
        try:
            payload: Any = wire_messages(messages)
        except ValueError as e:
            raise StageError(STAGE, f"cannot send the conversation: {e}") from e
        try:
            request: dict[str, Any] = {**self.options}
            if tools:
                request["tools"] = [dict(t) for t in tools]
            stream = self.client.chat.completions.create(
                model=self.name, messages=payload, stream=True, **request
            )
            replying = True
            for chunk in stream:
                for choice in chunk.choices[:1]:
                    delta = choice.delta
                    if delta is not None and delta.content:
                        yield delta.content
                    for part in (delta.tool_calls if delta is not None else None) or ():
                        partial = calls.setdefault(part.index, _PartialCall())
                        partial.id = partial.id or (part.id or "")
                        if part.function is not None:
                            partial.name = partial.name or (part.function.name or "")
                            partial.arguments += part.function.arguments or ""
                    if choice.finish_reason is not None:
                        finished = True
                        logger.debug("%s: finish_reason=%s", self.name, choice.finish_reason)
                        # Some servers say "stop" even when they called tools: the calls count.
                        done, calls = [calls[i] for i in sorted(calls)], {}
                        for partial in done:
                            if tools:
                                yield _complete(partial, self.name)
                            else:
                                logger.debug("%s called %s unasked", self.name, partial.name)
        except _FAILURES as e:
            raise StageError(STAGE, _describe(e, self.client, self.name, replying)) from e
        finally:
            # Runs on gen.close() too: closing the stream closes the socket.
            if stream is not None:
                stream.close()
        if not finished:
            raise StageError(
                STAGE,
                f"reply from LLM server at {_base_url(self.client)} ended before it was done",
            )

    def warm_up(self) -> None:
        """Have the server run the model once (one token), so the first call is not slow."""
        try:
            self.client.chat.completions.create(
                model=self.name,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=1,
                stream=False,
            )
        except _FAILURES as e:
            raise StageError(STAGE, _describe(e, self.client, self.name, False)) from e
        logger.info("%s answered at %s", self.name, _base_url(self.client))

    def check(self) -> None:
        """Raise ``ConfigError`` if the server is unreachable or does not serve the model."""
        url = _base_url(self.client)
        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise ConfigError(
                    f"the LLM server at {url} refused the API key: set VOICEBOT_OPENAI_API_KEY"
                ) from e
            raise ConfigError(
                f"the LLM server at {url} answered HTTP {e.status_code} to GET /models: is "
                "VOICEBOT_OPENAI_BASE_URL the API root (usually ending in /v1)?"
            ) from e
        except _FAILURES as e:
            raise ConfigError(
                f"no OpenAI-compatible server reachable at {url}: start vLLM, llama-server, "
                "LM Studio or LiteLLM there, or set VOICEBOT_OPENAI_BASE_URL"
            ) from e
        if served and self.name not in served:
            raise ConfigError(
                f"model {self.name} is not served at {url} (it serves {', '.join(served[:8])}): "
                "set the persona's llm_model to one of them"
            )


__all__ = [
    "OpenAIChat",
    "ToolCallRequest",
    "WireMessage",
    "make_openai_client",
    "openai_options",
    "wire_messages",
]
