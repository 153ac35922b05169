"""FastRTC adapter: a ``StreamHandler`` that drives one ``Call``.

The only module that touches FastRTC's internals: the page's inputs (``wait_for_args``,
``latest_args``), the output queue it holds for the client (``_clear_queue``), its output
wrappers (``AdditionalOutputs``, ``CloseStream``) and its connection context (a websocket
connection's state, since FastRTC never calls ``shutdown`` when a websocket closes).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Generator
from typing import Any

import scipy.signal  # noqa: F401  (resampling: load it with the handler, not on the first reply)
from fastrtc import AdditionalOutputs, CloseStream, StreamHandler

from voicebot.audio import Audio, StreamResampler
from voicebot.call.clock import Clock
from voicebot.call.events import AudioOut, CallOutput, CloseCall
from voicebot.call.playout import OUTPUT_RATE
from voicebot.call.record import CallObserver
from voicebot.call.session import Call
from voicebot.conversation import Channel, Message, Turn
from voicebot.vad import VAD_SAMPLE_RATE

logger = logging.getLogger(__name__)

EMIT_WAIT_S = 0.01
"""Longest ``emit`` blocks for something to hand out (WebRTC: FastRTC calls it on its shared
executor)."""
WEBSOCKET_EMIT_WAIT_S = 0.1
"""The same on FastRTC's websocket (``emit`` returns as soon as something is due). That
transport queues every result of ``emit``, ``None`` included, and sends one item per 20 ms:
an ``emit`` that gave up after 10 ms flooded the queue with ``None`` while the agent was silent
(every idle second put the next reply 0.5 s later) and halved a reply's pace (a ``None``
between frames)."""
OPUS_RATE = 48000
"""What a WebRTC track carries: audio handed to FastRTC at another rate is resampled by
aiortc's Opus encoder, whose resampler holds each frame back until the next (20 ms)."""
PAGE_INPUT_WAIT_S = 5.0


class VoiceHandler(StreamHandler):
    """One call over FastRTC; ``copy()`` makes the next connection's handler."""

    def __init__(
        self,
        runtime: Any,
        *,
        channel: Channel = "web",
        persona: str | None = None,
        persona_from_ui: bool = False,
        conversation_id: uuid.UUID | None = None,
        history: list[Message] | None = None,
        sequence_start: int = 0,
        greet: bool = True,
        clock: Clock | None = None,
        caller_ref: str | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        super().__init__(
            expected_layout="mono",
            output_sample_rate=OUTPUT_RATE,
            input_sample_rate=VAD_SAMPLE_RATE,
        )
        self.runtime = runtime
        self.persona_from_ui = persona_from_ui
        self.call = Call(
            runtime,
            channel=channel,
            persona=persona,
            conversation_id=conversation_id,
            history=history,
            sequence_start=sequence_start,
            greet=greet,
            clock=clock,
            caller_ref=caller_ref,
            observer=observer,
        )
        self.call.on_interrupt = self._interrupted
        self.call.on_end = self._call_over
        self._upsample: StreamResampler | None = None
        self._own_resampler = False  # resample the caller's audio as it comes (not FastRTC's)
        self._emit_wait_s = EMIT_WAIT_S
        self.on_interrupt: Callable[[], None] | None = None
        """Called (on the call's policy thread) when the agent is stopped mid-reply: a
        transport drops the audio it still holds for the client (Twilio's ``clear``)."""

    # -- what the server and the tools read

    @property
    def channel_kind(self) -> Channel:
        return self.call.channel

    @property
    def persona_name(self) -> str:
        return self.call.persona_name

    @property
    def conversation_id(self) -> uuid.UUID:
        return self.call.conversation_id

    @property
    def history(self) -> list[Message]:
        return self.call.history

    @property
    def completed_turns(self) -> list[Turn]:
        return self.call.completed_turns

    @property
    def greet(self) -> bool:
        return self.call.greet

    @property
    def caller_ref(self) -> str | None:
        return self.call.caller_ref

    @property
    def observer(self) -> CallObserver | None:
        return self.call.observer

    # -- FastRTC's interface

    def copy(self) -> VoiceHandler:
        """A fresh handler for the next connection, sharing the process-wide runtime."""
        return VoiceHandler(
            self.runtime,
            channel=self.call.channel,
            persona=self.call.persona_name,
            persona_from_ui=self.persona_from_ui,
            greet=self.call.greet,
            clock=self.call.clock,
            observer=self.call.observer,
        )

    def start_up(self) -> None:
        """Pick the persona, open the conversation and speak the greeting."""
        if self.persona_from_ui and not self.phone_mode and self._wait_for_page_inputs():
            # FastRTC stores [marker, *values]: Gradio sends the stream's own value (the
            # connection id) before the page's inputs, an API input hook calling
            # stream.set_input(webrtc_id, persona, conversation) does not. Our inputs are
            # the last two.
            args = [*self.latest_args[1:][-2:], None, None]
            if isinstance(args[0], str):
                self.set_persona(args[0])
            if isinstance(args[1], str) and args[1].strip():
                self.resume(args[1].strip())
        self._watch_websocket()
        self.call.start()

    def tune_for_websocket(self) -> None:
        """Before FastRTC's websocket transport starts calling ``emit``: wait longer for
        something to hand out (see ``WEBSOCKET_EMIT_WAIT_S``)."""
        self._emit_wait_s = WEBSOCKET_EMIT_WAIT_S

    def tune_for_webrtc(self) -> None:
        """For a WebRTC connection, before its track starts (FastRTC reads the rates then):
        hand audio out at Opus's 48 kHz, upsampled here frame by frame, and take the caller's
        audio frame by frame as it comes."""
        if self.output_sample_rate != OPUS_RATE:
            self._upsample = StreamResampler(OUTPUT_RATE, OPUS_RATE)
            self.output_sample_rate = OPUS_RATE
            self.output_frame_size = OPUS_RATE // 50
        self._own_resampler = True

    def resample(self, frame: Any) -> Generator[Any, None, None]:
        """FastRTC's input resampling (its audio track calls this); once tuned for WebRTC, each
        frame's samples as it comes: FastRTC's own keeps the input frame's sample count at the
        output rate (960 samples, 60 ms at 16 kHz), so the call would hear the caller in 60 ms
        batches (and a fixed frame size would hold each frame back for the resampler's delay)."""
        if not self._own_resampler:
            yield from super().resample(frame)
            return
        if self._resampler is None:
            import av

            self._resampler = av.AudioResampler(  # type: ignore[assignment]
                format="s16",
                layout=self.expected_layout,
                rate=self.input_sample_rate,
            )
        yield from self._resampler.resample(frame)  # type: ignore[attr-defined]

    def _wait_for_page_inputs(self, timeout_s: float = PAGE_INPUT_WAIT_S) -> bool:
        """Ask the page for its inputs (persona, conversation); a client that never answers
        (an API-only WebRTC client) gets the default persona instead of a stuck call."""
        waiting = asyncio.run_coroutine_threadsafe(self.wait_for_args(), self.loop)  # type: ignore[no-untyped-call]
        try:
            waiting.result(timeout=timeout_s)
        except TimeoutError:
            waiting.cancel()
            logger.warning(
                "no page inputs within %.0f s: persona %s", timeout_s, self.call.persona_name
            )
            return False
        return True

    def _watch_websocket(self) -> None:
        """On FastRTC's websocket, the call ends when the socket closes: FastRTC itself never
        calls ``shutdown`` there."""
        try:
            from fastrtc.utils import get_current_context

            websocket = get_current_context().websocket
        except Exception:  # no connection context (a direct caller, a test)
            return
        if websocket is None:
            return
        from starlette.websockets import WebSocketState

        def alive() -> bool:
            return (
                websocket.client_state == WebSocketState.CONNECTED
                and websocket.application_state == WebSocketState.CONNECTED
            )

        self.call.alive = alive

    def set_persona(self, name: str) -> None:
        """Switch persona (only before the call has started talking)."""
        self.call.set_persona(name)

    def resume(self, conversation_id: str | uuid.UUID) -> None:
        """Continue an earlier conversation: its id, numbering and history window."""
        self.call.resume(conversation_id)

    def receive(self, frame: Audio) -> None:
        """Take one input frame (any rate, int16 or float, mono or stereo)."""
        self.call.receive(frame)

    def emit(self) -> Any:
        """The next 20 ms of agent audio when due, an update for the page, or None."""
        output = self.call.next_output(self._emit_wait_s)
        if self._upsample is not None and isinstance(output, AudioOut):
            return self._upsample.to_rate, self._upsample(output.samples)
        return to_fastrtc(output)

    def shutdown(self) -> None:
        """The client went away (or the server stops): end the call now. Idempotent."""
        self.call.shutdown()

    def end_call(self, message: str = "") -> None:
        """Say ``message`` (if any), then close the stream; the reply in flight is stopped and
        recorded first."""
        self.call.end(message)

    def idle(self) -> bool:
        """Nothing being said or prepared, and every update handed out."""
        return self.call.idle()

    # -- from the call

    def _interrupted(self) -> None:
        clear_queue = self._clear_queue
        if clear_queue is not None:
            clear_queue()  # what FastRTC already holds for the client
        if self.on_interrupt is not None:
            self.on_interrupt()

    def _call_over(self) -> None:
        # The call ended on its own (its goodbye, a closed websocket): run the shutdown hooks
        # (a server's line accounting) as when FastRTC ends it; they run again harmlessly.
        self.shutdown()


def to_fastrtc(output: CallOutput | None) -> Any:
    """A call's output as FastRTC's ``emit`` returns it."""
    if output is None:
        return None
    if isinstance(output, AudioOut):
        return output.rate, output.samples
    if isinstance(output, CloseCall):
        return CloseStream(output.message)
    return AdditionalOutputs(output)


def from_fastrtc(item: Any) -> tuple[Audio | None, list[Any], bool]:
    """What a FastRTC handler's ``emit`` returned: ``(audio, page outputs, close?)``."""
    extra: list[Any] = []
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple):
        item, outputs = item  # ((rate, audio), AdditionalOutputs)
        extra.extend(outputs.args)
    if isinstance(item, tuple):
        return (int(item[0]), item[1]), extra, False
    if isinstance(item, AdditionalOutputs):
        return None, [*extra, *item.args], False
    if isinstance(item, CloseStream):
        return None, extra, True
    return None, extra, False


def install_clear_queue(handler: Any, clear: Callable[[], None]) -> None:
    """What FastRTC's audio track does for a handler: give it the function that empties the
    queue of audio it holds for the client."""
    handler._clear_queue = clear
