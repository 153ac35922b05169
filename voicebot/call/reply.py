"""One agent reply as a handle: its state, its texts and timings, and one cancel that reaches
every stage.

The stages run on two threads per reply: the producer (the LLM stream cut into speakable
chunks by the chunker, or fixed lines such as the greeting) and TTS, pipelined so the first
chunk is spoken while the LLM still writes the rest. Transcription is the call's (one pass at
a time, see ``transcription``); the policy hands a reply its transcript. Stages report to the
policy only through events; ``cancel`` closes the LLM stream at the next token, stops TTS
between two pieces of audio, and the policy drops what the playout still holds.

With a persona that has tools, the producer runs the ``ToolLoop``: on a tool call the LLM
stream pauses, the tool runs on a thread of its own (``reply-N-tool``, started by the call's
clock), the producer waits for it (off the audio path: what was said before the call keeps
playing), the persona's filler is spoken if it takes longer than ~0.7 s, and the model goes
on with the result. ``cancel`` reaches the tool too: it is told through its context, so a
booking not yet committed rolls back. Tool activity goes to the policy as ``ToolRunning`` /
``ToolDone`` events; it lands in the turn (``Turn.tool_calls``).

A preemptive reply (``held``, started before its turn is confirmed) synthesizes only its first
chunk ahead and stops at a tool call until ``confirm``: its audio is held by the playout, and
``cancel`` drops it without a tool having run. One that answers a draft transcript
(``defer_synthesis``) synthesizes nothing until ``allow_synthesis``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Literal, ParamSpec, TypeVar

import scipy.signal  # noqa: F401  (resampling: load it with the call, not on the first reply)

from voicebot.audio import Samples, resample
from voicebot.call.clock import Clock, RealClock
from voicebot.call.events import (
    AcknowledgementDue,
    CallEvent,
    ChunkReady,
    ReplyProduced,
    StageFailed,
    ToolDone,
    ToolRunning,
)
from voicebot.call.mailbox import Closed, Mailbox
from voicebot.call.playout import OUTPUT_RATE, Playout
from voicebot.chunking import Chunker, default_first_chunk_chars
from voicebot.conversation import Message, ToolCallRecord, Turn
from voicebot.cpu import FIRST_CHUNK, LATER_CHUNK, synthesis_priority
from voicebot.errors import StageError
from voicebot.llm import ToolChatModel
from voicebot.runtime import PersonaStack
from voicebot.tools.loop import ReplyEvent, ToolFinished, ToolLoop, ToolStarted
from voicebot.tools.registry import Toolset
from voicebot.tools.speech import speakable
from voicebot.tts import cancel_scope

logger = logging.getLogger(__name__)

ReplyState = Literal["pending", "speaking", "paused", "done", "cancelled"]
TTS_QUEUE_CHUNKS = 32
_HOLD_POLL_S = 0.02
"""How often a preemptive reply held at a tool call looks whether it was cancelled."""
_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass
class StageTimings:
    """Written by the reply's stage threads, read by the policy when it records the turn."""

    llm_ttft_ms: float | None = None
    llm_first_chunk_ms: float | None = None
    tts_first_ms: float | None = None


class Reply:
    """One reply in flight. Owned by the policy thread, except ``cancelled`` (read by every
    stage) and ``timings`` (written by the stages)."""

    def __init__(
        self,
        reply_id: int,
        turn: Turn | None,
        joiner: str,
        *,
        speech_end_t: float | None = None,
        closed_t: float | None = None,
        user_audio: Samples | None = None,
        held: bool = False,
    ) -> None:
        """``held``: a preemptive reply, started before its turn is confirmed: its audio is
        held back and it stops at a tool call until ``confirm``."""
        self.id = reply_id
        self.turn = turn
        """The user turn it answers; None for a fixed line (greeting, goodbye)."""
        self.joiner = joiner
        self.speech_end_t = speech_end_t
        self.closed_t = closed_t
        self.user_audio = user_audio
        self.state: ReplyState = "pending"
        self.texts: list[str] = []
        """Its chunks, in order, as the producer sent them."""
        self.stt_request: int | None = None
        """The transcription it waits for, while pending."""
        self.first_audio_at: float | None = None
        self.produced = False
        """Every stage has finished: no more audio will come."""
        self.timings = StageTimings()
        self.caption: Turn | None = None
        """For the greeting: the sequence-0 turn the page shows it as."""
        self.started = False
        """Its stage threads were started (they will report ``ReplyProduced``)."""
        self.recorded = False
        self.tool_calls: list[ToolCallRecord] = []
        """Its finished tool calls, in order (from ``ToolDone``)."""
        self.tool_running: ToolRunning | None = None
        """The tool call it waits for, if any."""
        self.caption_text = ""
        """What the page shows of it so far (the chunks that have started playing)."""
        self._cancelled = threading.Event()
        self._confirmed = threading.Event()
        self._synthesis_allowed = threading.Event()
        self._synthesis_allowed.set()
        if not held:
            self._confirmed.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def held(self) -> bool:
        """A preemptive reply whose turn is not confirmed (yet, or ever: it was dropped)."""
        return not self._confirmed.is_set()

    def confirm(self) -> None:
        """Its turn is confirmed: a preemptive reply may run tools (the policy releases its
        audio)."""
        self._synthesis_allowed.set()
        self._confirmed.set()

    def defer_synthesis(self) -> None:
        """It answers a draft transcript: synthesize nothing until ``allow_synthesis`` (the
        draft checked, or the turn closed at its pause), so the answer to a pause the user
        talks on after costs no TTS CPU, which the check's transcription needs."""
        self._synthesis_allowed.clear()

    def allow_synthesis(self) -> None:
        self._synthesis_allowed.set()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled")

    def cancel(self) -> None:
        """Stop every stage: the LLM stream is closed at its next token and TTS stops at its
        next piece of audio (the policy clears the playout)."""
        if self.state != "done":
            self.state = "cancelled"
        self._cancelled.set()

    @property
    def confirmed(self) -> threading.Event:
        """Set by ``confirm``: what a held reply's tool calls and later chunks wait for."""
        return self._confirmed

    @property
    def synthesis_allowed(self) -> threading.Event:
        """Clear while synthesis is deferred (``defer_synthesis``)."""
        return self._synthesis_allowed

    @property
    def cancel_event(self) -> threading.Event:
        """Set by ``cancel``: what the tool loop and a running tool watch."""
        return self._cancelled

    def tool_calls_so_far(self) -> list[ToolCallRecord]:
        """Its tool calls for the turn log: those that ended, and the one it waits for (if
        any) as cancelled: a barge-in cut it, and a booking not yet committed rolls back."""
        calls = list(self.tool_calls)
        running = self.tool_running
        if running is not None:
            calls.append(
                ToolCallRecord(
                    running.name,
                    running.arguments,
                    "cancelled by the caller while it ran (nothing not yet committed is kept)",
                    error="cancelled",
                )
            )
        return calls


@dataclass(frozen=True)
class LlmText:
    """A piece of the reply's text from the LLM stream."""

    text: str


LlmEvent = LlmText
"""What the plain LLM stage consumes; a persona with tools goes through the ``ToolLoop``
instead (see ``ReplyStages._tool_chunks``)."""


def llm_events(tokens: Iterable[str]) -> Iterator[LlmEvent]:
    """The chat model's stream as LLM events."""
    for token in tokens:
        yield LlmText(token)


class ClockExecutor(Executor):
    """Runs each submitted call on a new thread started by the call's clock (so a virtual
    clock sees it); a reply makes at most a few tool calls."""

    def __init__(self, clock: Clock, name: str) -> None:
        self._clock = clock
        self._name = name

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

        self._clock.start_thread(run, self._name)
        return future


class ReplyStages:
    """Starts the stage threads of replies for one call.

    toolset: the call's tools (``bind_tools``); a persona without tools has an empty one.
    """

    def __init__(
        self,
        clock: Clock,
        playout: Playout,
        post: Callable[[CallEvent], None],
        toolset: Toolset | None = None,
    ) -> None:
        self._clock = clock
        self._playout = playout
        self._post = post
        self._toolset = toolset

    def answer(self, reply: Reply, stack: PersonaStack, messages: list[Message]) -> None:
        """Speak the LLM's answer to ``messages`` (the apology if it fails), calling the
        persona's tools when the model asks."""
        toolset = self._toolset
        chat = stack.chat
        if toolset and hasattr(chat, "stream_with_tools"):
            tool_chat: ToolChatModel = chat  # type: ignore[assignment]
            self._start(
                reply, stack, lambda: self._tool_chunks(reply, stack, tool_chat, toolset, messages)
            )
            return
        if toolset:
            logger.warning("the chat model %s cannot call tools; answering without", chat.name)
        self._start(reply, stack, lambda: self._llm_chunks(reply, stack, messages))

    def say(self, reply: Reply, stack: PersonaStack, lines: list[str]) -> None:
        """Speak fixed lines."""
        self._start(reply, stack, lambda: iter(lines))

    def acknowledge(self, reply: Reply, stack: PersonaStack, at: float) -> None:
        """At clock time ``at``, post ``AcknowledgementDue`` with the persona's acknowledgement
        (made on first use, once per process) unless ``reply`` was cancelled by then; the
        policy decides whether it plays (see ``voicebot.acknowledgement``)."""

        def due() -> None:
            persona = stack.persona
            audio = stack.acknowledgement.get(
                persona.acknowledgement, stack.synthesizer, OUTPUT_RATE
            )
            if audio is None or reply.cancelled:
                return
            wait = at - self._clock.now()
            if wait > 0:
                self._clock.sleep(wait)
            if not reply.cancelled:
                self._post(AcknowledgementDue(reply.id, audio))

        self._clock.start_thread(due, f"reply-{reply.id}-ack")

    def _start(
        self, reply: Reply, stack: PersonaStack, chunks: Callable[[], Iterator[str]]
    ) -> None:
        reply.started = True
        pending: Mailbox[tuple[int, str]] = Mailbox(self._clock, TTS_QUEUE_CHUNKS)

        def produce() -> None:
            index = 0
            try:
                for text in chunks():
                    if reply.cancelled:
                        break
                    self._post(ChunkReady(reply.id, index, text))
                    pending.put((index, text))
                    index += 1
            except Exception:  # a bug in a stage must not end the call
                logger.exception("reply %d: generation failed", reply.id)
            finally:
                pending.close()

        def synthesize() -> None:
            try:
                # A cancel also reaches a synthesis still waiting for the shared voice.
                with cancel_scope(reply.cancel_event):
                    while True:
                        try:
                            item = pending.get()
                        except Closed:
                            return
                        if item is None or reply.cancelled:
                            continue
                        # Held (preemptive): only the first chunk is made ahead; the rest of
                        # the TTS work waits for the turn, so a dropped reply wastes little CPU.
                        if not self._until(reply, reply.synthesis_allowed):
                            continue
                        if item[0] > 0 and not self._until(reply, reply.confirmed):
                            continue
                        # a caller waits in silence for chunk 0: it synthesizes first (cpu.py)
                        with synthesis_priority(FIRST_CHUNK if item[0] == 0 else LATER_CHUNK):
                            self._synthesize(reply, stack, *item)
            finally:
                self._post(ReplyProduced(reply.id))

        self._clock.start_thread(synthesize, f"reply-{reply.id}-tts")
        self._clock.start_thread(produce, f"reply-{reply.id}-llm")

    def _llm_chunks(
        self, reply: Reply, stack: PersonaStack, messages: list[Message]
    ) -> Iterator[str]:
        """Speakable chunks from the LLM stream; on failure, the persona's apology."""
        timings = reply.timings
        chunker = self._chunker(stack)
        sent = self._clock.now()
        first_token_at: float | None = None
        written = 0  # characters after the first token
        stream = stack.chat.stream(messages)
        try:
            for event in llm_events(stream):
                if reply.cancelled:
                    break
                # Issue 13: a tool-call event pauses the stream here.
                if first_token_at is None:
                    first_token_at = self._clock.now()
                    timings.llm_ttft_ms = (first_token_at - sent) * 1000
                else:
                    written += len(event.text)
                chunks = chunker.feed(event.text)
                if chunks and timings.llm_first_chunk_ms is None:
                    timings.llm_first_chunk_ms = (self._clock.now() - sent) * 1000
                yield from chunks
            else:
                if first_token_at is not None:
                    stack.pace.streamed(written, self._clock.now() - first_token_at)
                chunks = chunker.flush()  # a one-chunk reply only completes here
                if chunks and timings.llm_first_chunk_ms is None:
                    timings.llm_first_chunk_ms = (self._clock.now() - sent) * 1000
                yield from chunks
        except StageError as e:
            logger.error("reply %d: %s", reply.id, e)
            self._post(StageFailed(reply.id, "llm", str(e)))
            yield from chunker.flush()
            yield stack.persona.apology
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # cancels the HTTP request when we stopped early

    def _tool_chunks(
        self,
        reply: Reply,
        stack: PersonaStack,
        chat: ToolChatModel,
        toolset: Toolset,
        messages: list[Message],
    ) -> Iterator[str]:
        """Speakable chunks of a reply that may call tools; on an LLM failure, the apology."""
        timings = reply.timings
        clock = self._clock
        loop = ToolLoop(
            chat,
            toolset,
            executor=ClockExecutor(clock, f"reply-{reply.id}-tool"),
            clock=clock.now,
            # A real clock waits on the tool's future (no polling delay); a virtual one must
            # see every wait.
            sleep=None if isinstance(clock, RealClock) else clock.sleep,
        )
        sent = clock.now()
        tool_reply = loop.reply(messages, cancel=reply.cancel_event)

        def timed(events: Iterable[ReplyEvent]) -> Iterator[ReplyEvent]:
            for event in events:
                if isinstance(event, ToolStarted) and not self._until(reply, reply.confirmed):
                    return  # dropped before its turn was confirmed: the tool never runs
                if isinstance(event, str) and timings.llm_ttft_ms is None:
                    timings.llm_ttft_ms = (clock.now() - sent) * 1000
                yield event

        def on_tool(event: ToolStarted | ToolFinished) -> None:
            if isinstance(event, ToolStarted):
                self._post(ToolRunning(reply.id, event.name, event.arguments))
            else:
                self._post(ToolDone(reply.id, event.record))

        chunker = self._chunker(stack)
        try:
            for chunk in speakable(timed(tool_reply), chunker, on_tool):
                if reply.cancelled:
                    break
                if timings.llm_first_chunk_ms is None:
                    timings.llm_first_chunk_ms = (clock.now() - sent) * 1000
                yield chunk
        except StageError as e:
            logger.error("reply %d: %s", reply.id, e)
            self._post(StageFailed(reply.id, "llm", str(e)))
            yield from chunker.flush()
            yield stack.persona.apology
        finally:
            tool_reply.close()  # stops the model's stream and tells a running tool

    @staticmethod
    def _chunker(stack: PersonaStack) -> Chunker:
        """A reply's chunker, its first chunk as short as the persona's measured pace allows."""
        language = stack.persona.language
        default = default_first_chunk_chars(language)
        shortest = stack.pace.first_chunk_min_chars(default)
        if shortest < default:
            logger.debug("first chunk from %d characters (%s)", shortest, stack.pace.estimates())
        return Chunker(language=language, first_chunk_min_chars=shortest)

    def _until(self, reply: Reply, gate: threading.Event) -> bool:
        """Hold a preemptive reply until ``gate`` opens: at a tool call until its turn is
        confirmed (a tool may book or cancel something: it must never run for a turn that
        did not happen), at synthesis while it may not synthesize; False once the reply was
        cancelled instead."""
        while not gate.is_set() and not reply.cancelled:
            if isinstance(self._clock, RealClock):
                gate.wait(_HOLD_POLL_S)  # opening it wakes this at once
            else:
                self._clock.sleep(_HOLD_POLL_S)  # a virtual clock must see every wait
        return not reply.cancelled

    def _synthesize(self, reply: Reply, stack: PersonaStack, index: int, text: str) -> None:
        ready = self._clock.now()
        audio_s = 0.0
        try:
            for rate, samples in stack.synthesizer.synthesize(text):
                if reply.timings.tts_first_ms is None:
                    reply.timings.tts_first_ms = (self._clock.now() - ready) * 1000
                audio_s += samples.size / rate
                audio = resample(samples, rate, OUTPUT_RATE)
                if reply.cancelled or not self._playout.push(reply.id, index, audio):
                    break
            else:
                # The chunks after the first are what a short first chunk must cover: their
                # synthesis (not the first's, which shares the CPU with the turn's
                # transcription) is the pace that counts.
                if index > 0:
                    stack.pace.synthesized(len(text), audio_s, self._clock.now() - ready)
        except Exception as e:
            logger.error("reply %d: tts failed: %s", reply.id, e)  # never the text itself
            self._post(
                StageFailed(reply.id, "tts", str(e) if isinstance(e, StageError) else f"tts: {e}")
            )
        finally:
            self._playout.end_chunk(reply.id, index)
