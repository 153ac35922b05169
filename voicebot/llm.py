"""The chat stage: stream a reply from Ollama through the official ``ollama`` client.

``OllamaChat.stream(messages)`` yields text; ``OllamaChat.stream_with_tools(messages, tools)``
also yields the model's ``ToolCallRequest``s (Ollama's ``message.tool_calls``), and takes the
tool round-trip messages (``AssistantToolCalls``, ``ToolResult``) in ``messages``.

Every failure during a turn becomes ``StageError("llm", ...)`` with a plain message (the
call survives); start-up checks raise ``ConfigError`` saying how to fix it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
import ollama

from voicebot.conversation import Message
from voicebot.errors import ConfigError, StageError

logger = logging.getLogger(__name__)

STAGE = "llm"


@dataclass(frozen=True)
class ToolCallRequest:
    """One tool call the model asked for: a tool name and its arguments (JSON, unvalidated)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AssistantToolCalls:
    """The assistant message that asked for tools; it precedes their ``ToolResult``s."""

    content: str
    calls: tuple[ToolCallRequest, ...]
    role: Literal["assistant"] = "assistant"


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer, sent back to the model as a ``tool`` message."""

    tool_name: str
    content: str
    role: Literal["tool"] = "tool"


ChatMessage = Message | AssistantToolCalls | ToolResult
"""Anything a chat request may hold: plain messages and the tool round trip."""

ToolSchema = Mapping[str, Any]
"""One entry of Ollama's ``tools``: ``{"type": "function", "function": {...}}``."""


class ChatModel(Protocol):
    """A chat LLM: streams the reply to ``messages`` as content deltas.

    Closing the returned iterator (``gen.close()``) cancels the request at once.
    """

    name: str

    def stream(self, messages: Sequence[Message]) -> Iterator[str]: ...


class ToolChatModel(Protocol):
    """A chat LLM that can call tools: streams content deltas and tool calls, in order.

    Closing the returned iterator cancels the request at once.
    """

    name: str

    def stream_with_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSchema]
    ) -> Iterator[str | ToolCallRequest]: ...


def make_client(
    host: str, *, timeout_s: float, connect_timeout_s: float = 3.0, **kwargs: Any
) -> ollama.Client:
    """An ``ollama.Client`` with explicit timeouts (its default is none).

    ``timeout_s`` bounds each read, so a server that stops sending fails after that long;
    extra keyword arguments go to ``httpx.Client`` (e.g. ``transport=`` in tests).
    """
    return ollama.Client(
        host=host, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), **kwargs
    )


def _http_client(client: ollama.Client) -> httpx.Client | None:
    # The ollama client keeps its httpx client private; we only read its URL and timeout
    # to make error messages concrete.
    inner = getattr(client, "_client", None)
    return inner if isinstance(inner, httpx.Client) else None


def _host_of(client: ollama.Client) -> str:
    inner = _http_client(client)
    return str(inner.base_url).rstrip("/") if inner is not None else "the configured host"


def _read_timeout_of(client: ollama.Client) -> float | None:
    inner = _http_client(client)
    return inner.timeout.read if inner is not None else None


def _is_model_missing(e: ollama.ResponseError) -> bool:
    return e.status_code == 404 and "not found" in str(e.error).lower()


def _describe(e: BaseException, client: ollama.Client, model: str) -> str:
    """A one-line, user-facing explanation of a failed Ollama call."""
    host = _host_of(client)
    if isinstance(e, ollama.ResponseError):
        if _is_model_missing(e):
            return f"model {model} is not pulled on {host}: run `ollama pull {model}`"
        if e.status_code == -1:  # an {"error": ...} line inside a 200 stream
            return f"Ollama failed mid-reply: {e.error}"
        return f"Ollama at {host} answered HTTP {e.status_code}: {e.error}"
    if isinstance(e, httpx.ConnectTimeout):
        return f"Ollama unreachable at {host} (connect timed out)"
    # The client turns httpx.ConnectError into a plain ConnectionError (non-streaming calls).
    if isinstance(e, httpx.ConnectError | ConnectionRefusedError) or type(e) is ConnectionError:
        return f"Ollama unreachable at {host} (connection refused)"
    if isinstance(e, httpx.TimeoutException):
        timeout = _read_timeout_of(client)
        within = f" within {timeout:g} s" if timeout is not None else ""
        return f"Ollama at {host} sent nothing{within}; giving up"
    if isinstance(e, httpx.RemoteProtocolError | httpx.ReadError | ConnectionError):
        return f"connection to Ollama at {host} dropped mid-reply"
    if isinstance(e, httpx.TransportError):
        return f"Ollama request to {host} failed: {e}"
    if isinstance(e, ValueError):  # bad JSON or a reply that does not validate
        return f"unexpected reply from Ollama at {host}: {e}"
    return f"Ollama request to {host} failed: {e}"


# What the ollama client and httpx raise for a failed call.
_FAILURES = (ollama.ResponseError, httpx.HTTPError, ConnectionError, ValueError)


class OllamaChat:
    """``ChatModel`` backed by an Ollama server.

    ``options`` (temperature, num_ctx, ...) and ``keep_alive`` go with every request;
    a long keep_alive stops Ollama from unloading the model between turns.
    """

    def __init__(
        self,
        client: ollama.Client,
        model: str,
        *,
        options: Mapping[str, Any] | None = None,
        keep_alive: str | float = "30m",
    ) -> None:
        self.client = client
        self.name = model
        self.options = dict(options) if options else None
        self.keep_alive = keep_alive

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
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSchema]
    ) -> Generator[str | ToolCallRequest, None, None]:
        """Like ``stream``, offering ``tools``; the model's tool calls come out in order."""
        return self._chat(messages, tools)

    def _chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSchema]
    ) -> Generator[str | ToolCallRequest, None, None]:
        payload = [_wire_message(m) for m in messages]
        parts: Iterator[ollama.ChatResponse] = iter(())
        finished = False
        try:
            parts = self.client.chat(
                model=self.name,
                messages=payload,
                tools=list(tools) or None,
                stream=True,
                options=self.options,
                keep_alive=self.keep_alive,
            )
            for part in parts:
                content = part.message.content
                if content:
                    yield content
                for call in part.message.tool_calls or ():
                    yield ToolCallRequest(call.function.name, dict(call.function.arguments))
                if part.done:
                    finished = True
                    logger.debug(
                        "%s: %s tokens, done_reason=%s, eval %.0f ms",
                        self.name,
                        part.eval_count,
                        part.done_reason,
                        (part.eval_duration or 0) / 1e6,
                    )
        except _FAILURES as e:
            raise StageError(STAGE, _describe(e, self.client, self.name)) from e
        finally:
            # Runs on gen.close() too (GeneratorExit at our yield): closing the client's
            # generator leaves its `with client.stream(...)`, which closes the socket.
            if isinstance(parts, Generator):
                parts.close()
        if not finished:
            raise StageError(
                STAGE, f"reply from Ollama at {_host_of(self.client)} ended before it was done"
            )

    def warm_up(self) -> None:
        """Load the model and keep it loaded (an empty chat, as Ollama documents)."""
        try:
            self.client.chat(model=self.name, messages=[], stream=False, keep_alive=self.keep_alive)
        except _FAILURES as e:
            raise StageError(STAGE, _describe(e, self.client, self.name)) from e
        logger.info("%s loaded (keep_alive=%s)", self.name, self.keep_alive)

    def check(self) -> None:
        """Raise ``ConfigError`` if Ollama is unreachable or the model is not pulled."""
        host = _host_of(self.client)
        try:
            self.client.show(self.name)
        except ollama.ResponseError as e:
            if e.status_code == 404:
                raise ConfigError(
                    f"model {self.name} is not pulled: run `ollama pull {self.name}`"
                ) from e
            raise ConfigError(f"Ollama at {host} refused `show {self.name}`: {e.error}") from e
        except (httpx.HTTPError, ConnectionError) as e:
            raise ConfigError(
                f"Ollama is not reachable at {host}: start it with `ollama serve` "
                "or set OLLAMA_HOST"
            ) from e


def pull_model(
    client: ollama.Client,
    model: str,
    progress: Callable[[str, int | None, int | None], None],
) -> None:
    """Pull ``model``, reporting ``progress(status, completed_bytes, total_bytes)``.

    Raises ``ConfigError`` when the server is unreachable or the pull fails.
    """
    host = _host_of(client)
    try:
        for part in client.pull(model, stream=True):
            progress(part.status or "", part.completed, part.total)
    except ollama.ResponseError as e:
        raise ConfigError(f"could not pull {model} on {host}: {e.error}") from e
    except (httpx.HTTPError, ConnectionError) as e:
        raise ConfigError(
            f"Ollama is not reachable at {host}: start it with `ollama serve` or set OLLAMA_HOST"
        ) from e


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    """One message as Ollama's ``/api/chat`` takes it."""
    if isinstance(message, AssistantToolCalls):
        return {
            "role": "assistant",
            "content": message.content,
            "tool_calls": [
                {"function": {"name": c.name, "arguments": c.arguments}} for c in message.calls
            ],
        }
    if isinstance(message, ToolResult):
        return {"role": "tool", "content": message.content, "tool_name": message.tool_name}
    return {"role": message.role, "content": message.content}


def build_messages(
    system_prompt: str,
    history: Sequence[Message],
    user_text: str,
    max_history_messages: int,
) -> list[Message]:
    """System prompt, then the last ``max_history_messages`` of history, then the user.

    A cut window never opens on an assistant message: a reply without its question misleads
    the model. System messages inside ``history`` are dropped (the prompt is always first).
    """
    if max_history_messages < 0:
        raise ValueError("max_history_messages must be >= 0")
    turns = [m for m in history if m.role != "system"]
    window = turns[len(turns) - max_history_messages :] if max_history_messages else []
    # A cut window must not open on a reply without its question; the whole history may
    # (the greeting).
    while len(window) < len(turns) and window and window[0].role == "assistant":
        window = window[1:]
    messages = [Message("system", system_prompt)] if system_prompt else []
    return [*messages, *window, Message("user", user_text)]


__all__ = [
    "AssistantToolCalls",
    "ChatMessage",
    "ChatModel",
    "OllamaChat",
    "ToolCallRequest",
    "ToolChatModel",
    "ToolResult",
    "ToolSchema",
    "build_messages",
    "make_client",
    "pull_model",
]
