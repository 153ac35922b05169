"""A reply that may call tools: text deltas and tool activity, in the order they happen.

``ToolLoop.reply(messages, cancel)`` returns a ``ToolReply``: iterate it for ``str`` (text to
speak) and ``ToolStarted`` / ``ToolFiller`` / ``ToolFinished`` events. When the model asks for
tools, the LLM stream has ended; each tool runs on the loop's executor (off the audio path)
within its timeout, its result goes back to the model as a ``tool`` message after the assistant
message that held the calls, and the model's continuation streams on.

- Unknown tool, wrong types, missing fields: the model is told (a tool result with the error)
  and the reply goes on.
- A tool that raises or times out: ``ToolFinished`` says so, the persona's tool apology is the
  reply's last text, and the model is not asked again in this turn.
- ``cancel`` set (barge-in): the reply stops at once; a running tool is told (its context's
  ``cancelled``), so a booking not yet committed is rolled back and one that committed stays
  whole. ``ToolReply.tool_calls`` keeps every call, cancelled ones included, for the turn log.
- At most ``max_rounds`` rounds of tool calls per reply; the round after that offers no tools.
- The model failing raises ``StageError("llm", ...)`` out of the iteration, as
  ``OllamaChat.stream`` does; the calls made so far stay in ``ToolReply.tool_calls``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from voicebot.conversation import ToolCallRecord
from voicebot.llm import AssistantToolCalls, ChatMessage, ToolCallRequest, ToolChatModel, ToolResult
from voicebot.tools.registry import Tool, Toolset

logger = logging.getLogger(__name__)

_POLL_S = 0.02  # how often a wait for a tool looks at the cancel event


@dataclass(frozen=True)
class ToolStarted:
    """The model called a tool and it is about to run (or be refused)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolFiller:
    """A tool is taking a while: say ``text`` now (at most once per reply)."""

    text: str


@dataclass(frozen=True)
class ToolFinished:
    """A tool call ended; ``record`` goes into the turn log."""

    record: ToolCallRecord


ReplyEvent = str | ToolStarted | ToolFiller | ToolFinished
"""What a ``ToolReply`` yields: text deltas to speak, and tool activity."""


@dataclass
class ToolReply:
    """One reply in flight. Iterate once; ``close()`` (or the cancel event) stops it."""

    events: Generator[ReplyEvent, None, None]
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    """Every tool call of this reply so far, in order (also those cut by a cancel)."""

    def __iter__(self) -> Iterator[ReplyEvent]:
        return self.events

    def close(self) -> None:
        self.events.close()


class ToolLoop:
    """Runs replies with tools for one call.

    chat: the model; toolset: the call's tools; executor: where tools run (a small pool owned
    by the caller; a tool that ignores its timeout keeps one of its threads until it returns).
    filler_after_s: how long a tool may run before the persona's filler line is offered.
    cancel_grace_s: after a cancel or timeout, how long to wait for the tool to finish, so the
    record says what really happened (committed or not).
    clock, sleep: the loop's time; with ``sleep`` given, waits for a tool poll with it (a
    call's virtual clock) instead of waiting on the future.
    """

    def __init__(
        self,
        chat: ToolChatModel,
        toolset: Toolset,
        *,
        executor: Executor,
        max_rounds: int = 4,
        filler_after_s: float = 0.7,
        cancel_grace_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.chat = chat
        self.toolset = toolset
        self.executor = executor
        self.max_rounds = max_rounds
        self.filler_after_s = filler_after_s
        self.cancel_grace_s = cancel_grace_s
        self.clock = clock
        self.sleep = sleep

    def _wait(self, future: Future[str], timeout: float) -> None:
        if self.sleep is None:
            concurrent.futures.wait([future], timeout=timeout)
        elif not future.done():
            self.sleep(timeout)

    def reply(
        self, messages: Sequence[ChatMessage], cancel: threading.Event | None = None
    ) -> ToolReply:
        """Start a reply to ``messages`` (system prompt first, user message last)."""
        records: list[ToolCallRecord] = []
        return ToolReply(self._run(list(messages), cancel or threading.Event(), records), records)

    # -- the reply ---------------------------------------------------------------------------

    def _run(
        self, history: list[ChatMessage], cancel: threading.Event, records: list[ToolCallRecord]
    ) -> Generator[ReplyEvent, None, None]:
        persona = self.toolset.context.persona
        filler = [persona.tool_filler] if persona.tool_filler else []
        for round_ in range(self.max_rounds + 1):
            offered = self.toolset.schemas() if round_ < self.max_rounds else []
            text: list[str] = []
            calls: list[ToolCallRequest] = []
            stream = self.chat.stream_with_tools(history, offered)
            try:
                for event in stream:
                    if cancel.is_set():
                        return
                    if isinstance(event, str):
                        text.append(event)
                        yield event
                    else:
                        calls.append(event)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            if not calls or cancel.is_set():
                return
            if not offered:
                logger.warning(
                    "model called tools that were not offered (%s) after %d tool rounds; "
                    "ending the reply",
                    ", ".join(c.name for c in calls),
                    round_,
                )
                return
            history.append(AssistantToolCalls("".join(text), tuple(calls)))
            for call in calls:
                yield ToolStarted(call.name, dict(call.arguments))
                try:
                    record = yield from self._call(call, cancel, filler)
                except GeneratorExit:
                    records.append(
                        ToolCallRecord(
                            call.name,
                            dict(call.arguments),
                            "cancelled by the caller (reply closed)",
                            error="cancelled",
                        )
                    )
                    raise
                records.append(record)
                yield ToolFinished(record)
                if record.error == "cancelled":
                    return
                if record.error in ("timeout", "failed"):
                    yield persona.tool_apology or persona.apology
                    return
                history.append(ToolResult(call.name, record.result))

    def _call(
        self, call: ToolCallRequest, cancel: threading.Event, filler: list[str]
    ) -> Generator[ReplyEvent, None, ToolCallRecord]:
        """Validate and run one call; yields a filler when it is slow; returns its record."""
        arguments = dict(call.arguments)
        tool = self.toolset.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.toolset.tools) or "none"
            logger.info("model called an unknown tool %r", call.name)
            return ToolCallRecord(
                call.name,
                arguments,
                f"error: there is no tool named {call.name!r}; the tools are: {known}",
                error="unknown_tool",
            )
        try:
            args = tool.arguments.model_validate(arguments)
        except ValidationError as e:
            logger.info("model called %s with invalid arguments: %s", call.name, _problems(e))
            return ToolCallRecord(
                call.name,
                arguments,
                f"error: invalid arguments for {call.name}: {_problems(e)}. "
                "Ask the caller if something is missing, then call it again.",
                error="invalid_arguments",
            )
        context = replace(self.toolset.context, cancelled=threading.Event())
        started = self.clock()
        future = self.executor.submit(_run_tool, tool, context, args)
        deadline = started + tool.timeout_s
        try:
            while True:
                self._wait(future, _POLL_S)
                if future.done():
                    return self._finished(tool, arguments, future, started)
                now = self.clock()
                if cancel.is_set() or now >= deadline:
                    context.cancelled.set()
                    reason = "cancelled" if cancel.is_set() else "timeout"
                    return self._abandoned(tool, arguments, future, started, reason)
                if filler and now - started >= self.filler_after_s:
                    yield ToolFiller(filler.pop())
        except GeneratorExit:  # the reply was closed while the tool ran
            context.cancelled.set()
            raise

    def _finished(
        self, tool: Tool, arguments: dict[str, Any], future: Future[str], started: float
    ) -> ToolCallRecord:
        tool_ms = (self.clock() - started) * 1000
        error = future.exception()
        if error is not None:
            logger.error("tool %s failed after %.0f ms: %s", tool.name, tool_ms, error)
            return ToolCallRecord(
                tool.name, arguments, f"error: the tool failed: {error}", tool_ms, error="failed"
            )
        result = future.result()
        logger.info("tool %s answered in %.0f ms: %s", tool.name, tool_ms, result)
        return ToolCallRecord(tool.name, arguments, result, tool_ms)

    def _abandoned(
        self,
        tool: Tool,
        arguments: dict[str, Any],
        future: Future[str],
        started: float,
        reason: str,
    ) -> ToolCallRecord:
        # The tool was told to stop; give it a moment so that the record says whether what
        # it was doing committed.
        give_up = self.clock() + self.cancel_grace_s
        while not future.done() and self.clock() < give_up:
            self._wait(future, min(_POLL_S, give_up - self.clock()))
        tool_ms = (self.clock() - started) * 1000
        if future.done() and future.exception() is None:
            outcome = future.result()
        else:
            future.cancel()
            outcome = "did not finish"
        if reason == "timeout":
            logger.warning("tool %s timed out after %.1f s", tool.name, tool.timeout_s)
            result = f"error: {tool.name} timed out after {tool.timeout_s:g} s ({outcome})"
        else:
            logger.info("tool %s cancelled by the caller after %.0f ms", tool.name, tool_ms)
            result = f"cancelled by the caller ({outcome})"
        return ToolCallRecord(tool.name, arguments, result, tool_ms, error=reason)


def _run_tool(tool: Tool, context: Any, args: BaseModel) -> str:
    return str(tool.run(context, args))


def _problems(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in e.errors()
    )
