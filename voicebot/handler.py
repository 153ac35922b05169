"""The call: our FastRTC stream handler, wiring turn-taking to STT → LLM → chunking → TTS.

Threads, per call:
- FastRTC calls ``receive`` (one worker thread at a time) with input frames: VAD and the turn
  state machine run there (well under 1 ms per 32 ms window).
- A finished user turn starts a reply on its own thread: STT, then the LLM stream, cut into
  speakable chunks that go to a TTS thread, whose audio goes into the playback buffer while the
  LLM keeps generating.
- FastRTC calls ``emit`` (one worker thread at a time), which hands out 20 ms frames at playback
  pace, only a little ahead of real time, so a barge-in can drop what is queued at once and
  we know which part of the reply the user actually heard.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import scipy.signal  # noqa: F401  (resampling: load it with the handler, not on the first reply)
from fastrtc import AdditionalOutputs, CloseStream, StreamHandler

from voicebot.audio import Audio, Samples, resample, to_mono_float32
from voicebot.backchannel import is_backchannel
from voicebot.call.status import CallState, CallStatus
from voicebot.chunking import Chunker
from voicebot.conversation import Channel, Conversation, Message, Timings, Turn, utc_now
from voicebot.errors import StageError
from voicebot.llm import build_messages
from voicebot.runtime import PersonaStack, Runtime
from voicebot.turns import BargeIn, EndCandidate, SpeechStarted, TurnDetector, UserTurn
from voicebot.vad import VAD_SAMPLE_RATE

logger = logging.getLogger(__name__)

OUTPUT_RATE = 24000
FRAME_SAMPLES = OUTPUT_RATE // 50  # 20 ms
FRAME_S = FRAME_SAMPLES / OUTPUT_RATE
PLAYBACK_LEAD_S = 0.06
"""How far ahead of real time audio is handed to FastRTC: enough to ride out scheduling
jitter, little enough that a barge-in silences the agent within a frame or three."""
EMIT_WAIT_S = 0.01


class CallObserver(Protocol):
    """Hears about every finished turn (metrics); called on a pipeline thread, must not block."""

    def turn_finished(self, turn: Turn, channel: Channel) -> None: ...


@dataclass
class TurnUpdate:
    """What the UI shows for a turn: sent as FastRTC ``AdditionalOutputs``."""

    turn: Turn
    final: bool


@dataclass
class _Chunk:
    text: str
    pushed: int = 0  # output samples synthesized
    played: int = 0  # output samples handed out by emit()
    done: bool = False  # synthesis finished


@dataclass
class _Reply:
    """One agent reply in flight."""

    turn: Turn | None  # None for the greeting
    joiner: str = " "  # between chunks: a space in English, nothing in Japanese
    speech_end_t: float | None = None
    closed_t: float | None = None  # when the user turn was closed
    user_audio: Samples | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    chunks: list[_Chunk] = field(default_factory=list)
    first_audio_t: float | None = None
    last_frame_t: float | None = None
    producing: bool = True  # STT/LLM/TTS still at work
    finished: bool = False  # recorded; nothing more to do
    caption: Turn | None = None  # what the page shows of a greeting or goodbye (sequence 0)

    def played_text(self) -> str:
        """The part of the reply the user heard: whole chunks, then a prefix of the last one."""
        parts: list[str] = []
        for chunk in self.chunks:
            if chunk.played == 0:
                break
            if chunk.done and chunk.played >= chunk.pushed:
                parts.append(chunk.text)
                continue
            fraction = chunk.played / max(chunk.pushed, 1)
            if not chunk.done:
                fraction *= 0.5  # more audio is coming for this chunk: be conservative
            cut = int(len(chunk.text) * fraction)
            prefix = chunk.text[:cut]
            if self.joiner:  # cut at a word boundary
                prefix = prefix.rsplit(" ", 1)[0] if " " in prefix else ""
            if prefix:
                parts.append(prefix + "…")
            break
        return self.joiner.join(parts)


@dataclass
class _Frame:
    reply: _Reply
    chunk: _Chunk
    samples: Samples


class VoiceHandler(StreamHandler):
    """One call's turn-taking and reply pipeline; ``copy()`` makes the next call's handler."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        channel: Channel = "web",
        persona: str | None = None,
        persona_from_ui: bool = False,
        conversation_id: uuid.UUID | None = None,
        history: list[Message] | None = None,
        sequence_start: int = 0,
        greet: bool = True,
        clock: Callable[[], float] = time.monotonic,
        caller_ref: str | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        super().__init__(
            expected_layout="mono",
            output_sample_rate=OUTPUT_RATE,
            input_sample_rate=VAD_SAMPLE_RATE,
        )
        self.runtime = runtime
        self.channel_kind: Channel = channel
        self.persona_name = persona or runtime.default_persona
        self.persona_from_ui = persona_from_ui
        self.conversation_id = conversation_id or uuid.uuid4()
        self.history: list[Message] = list(history or [])
        self.greet = greet
        self._clock = clock
        self._lock = threading.Condition()
        self._stack: PersonaStack = runtime.stack(self.persona_name)
        self._detector = TurnDetector(runtime.turn_config, runtime.vad.stream())
        self._frame_times: deque[tuple[int, float]] = deque(maxlen=512)
        self._frames: deque[_Frame] = deque()
        self._outputs: deque[Any] = deque()
        self._reply: _Reply | None = None
        self._paused: _Reply | None = None  # talked over: silent until we know why
        self._announced = False  # the current utterance gave SpeechStarted or BargeIn
        self._carry_audio: Samples | None = None
        self._speculative: tuple[int, Future[str]] | None = None
        self._play_t0: float | None = None
        self._play_count = 0
        self._sequence = sequence_start  # a resumed conversation numbers on
        self._started = False
        self._closed = False
        self._receive_errors = 0
        self._last_status: tuple[CallState, str | None] | None = None
        self._close_message: str | None = None
        self.completed_turns: list[Turn] = []
        self.caller_ref = caller_ref
        """Stored on the conversation: a salted hash of the caller's number, never the number."""
        self.observer = observer
        self.on_interrupt: Callable[[], None] | None = None
        """Called (on a pipeline thread) when a barge-in stops the agent: a transport drops the
        audio it still holds for the client (Twilio's ``clear``)."""

    # ------------------------------------------------------------------ FastRTC interface

    def copy(self) -> VoiceHandler:
        """A fresh handler for the next connection, sharing the process-wide runtime."""
        return VoiceHandler(
            self.runtime,
            channel=self.channel_kind,
            persona=self.persona_name,
            persona_from_ui=self.persona_from_ui,
            greet=self.greet,
            clock=self._clock,
            observer=self.observer,
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
        self._open()

    def _wait_for_page_inputs(self, timeout_s: float = 5.0) -> bool:
        """Ask the page for its inputs (persona, conversation); a client that never answers
        (an API-only WebRTC client) gets the default persona instead of a stuck call."""
        waiting = asyncio.run_coroutine_threadsafe(self.wait_for_args(), self.loop)  # type: ignore[no-untyped-call]
        try:
            waiting.result(timeout=timeout_s)
        except TimeoutError:
            waiting.cancel()
            logger.warning("no page inputs within %.0f s: persona %s", timeout_s, self.persona_name)
            return False
        return True

    def resume(self, conversation_id: str | uuid.UUID) -> None:
        """Continue an earlier conversation: its id, numbering and history window."""
        store = self.runtime.store
        try:
            cid = uuid.UUID(str(conversation_id))
        except ValueError:
            logger.warning(
                "not a conversation id: %r; starting a new conversation", conversation_id
            )
            return
        if store is None:
            logger.warning("no turn log: cannot continue conversation %s", cid)
            return
        try:
            turns = store.recent_turns(cid, self._stack.persona.history_turns)
        except StageError as e:
            logger.warning("%s; starting a new conversation", e)
            return
        self.conversation_id = cid
        self.history = [m for turn in turns for m in turn.history_messages()]
        self._sequence = max((t.sequence for t in turns), default=0)

    def _open(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        persona = self._stack.persona
        if self.runtime.store is not None:
            self.runtime.store.open_conversation(
                Conversation(
                    self.conversation_id,
                    persona.name,
                    self.channel_kind,
                    caller_ref=self.caller_ref,
                )
            )
        logger.info("call %s started with persona %s", self.conversation_id, persona.name)
        self._status("listening")
        if self.greet and persona.greeting and not self.history:
            self._speak_canned(persona.greeting)

    def set_persona(self, name: str) -> None:
        """Switch persona (only before the call has started talking)."""
        if name not in self.runtime.stacks:
            logger.warning("unknown persona %r; keeping %s", name, self.persona_name)
            return
        self.persona_name = name
        self._stack = self.runtime.stack(name)

    def receive(self, frame: Audio) -> None:
        """Take one input frame (any rate, int16 or float, mono or stereo)."""
        try:
            self._receive(frame)
        except Exception:
            # One bad frame or a bug in a stage must not end the call: log it once per call.
            self._receive_errors += 1
            if self._receive_errors == 1:
                logger.exception("call %s: dropping an input frame", self.conversation_id)

    def _receive(self, frame: Audio) -> None:
        if not self._started:
            self._open()
        try:
            rate, samples = to_mono_float32(frame)
        except ValueError as e:
            self._receive_errors += 1
            if self._receive_errors == 1:
                logger.warning("call %s: dropping input frames: %s", self.conversation_id, e)
            return
        samples = resample(samples, rate, VAD_SAMPLE_RATE)
        now = self._clock()
        with self._lock:
            agent_speaking = self._agent_audible()
        events = self._detector.push(samples, agent_speaking=agent_speaking)
        self._frame_times.append((self._detector.samples_seen, now))
        config = self.runtime.turn_config
        # utterance_samples also counts the trailing silence that has not closed the turn yet:
        # a 1.1 s 「なるほどですね」 must not count as 1.4 s of speech.
        if (
            self._paused is not None
            and self._detector.utterance_samples
            > (config.backchannel_max_ms + config.end_silence_ms) * VAD_SAMPLE_RATE // 1000
        ):
            self._stop_paused_reply("speech too long for a backchannel")
        for event in events:
            if isinstance(event, BargeIn):
                self._announced = True
                self._on_barge_in(event)
            elif isinstance(event, EndCandidate):
                self._on_end_candidate(event)
            elif isinstance(event, UserTurn):
                announced, self._announced = self._announced, False
                if not announced:
                    # Began while the agent talked, too short for a barge-in (a brief うん, a
                    # cough): judge it like any overlap instead of dropping the reply for it.
                    self._pause_for_overlap()
                if self._paused is not None:
                    self._settle_pause(event, now)
                else:
                    self._on_user_turn(event, now)
            elif isinstance(event, SpeechStarted):
                self._announced = True
                self._on_speech_started()

    def emit(self) -> Any:
        """The next 20 ms of agent audio when due, a transcript update, or None."""
        deadline = self._clock() + EMIT_WAIT_S
        with self._lock:
            while True:
                if self._outputs:
                    return AdditionalOutputs(self._outputs.popleft())
                if self._close_message is not None and not self._frames and self._reply is None:
                    message, self._close_message = self._close_message, None
                    return CloseStream(message)
                now = self._clock()
                if self._frames and self._paused is None:
                    if self._play_t0 is None or now > self._next_due() + 0.2:
                        # A new stretch of speech: its clock starts now.
                        self._play_t0, self._play_count = now, 0
                    due = self._next_due()
                    if due <= now:
                        return self._pop_frame(now)
                    wait = min(due, deadline) - now
                else:
                    if self._paused is None:
                        self._finish_replies_locked()
                    if self._outputs:
                        continue
                    wait = deadline - now
                if wait <= 0 or self._closed:
                    return None
                self._lock.wait(wait)

    def shutdown(self) -> None:
        """The client went away: stop generating at once and close the conversation."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reply = self._reply
            self._frames.clear()
            self._lock.notify_all()
        if reply is not None and not reply.finished:
            reply.cancel.set()
            self._finalize(reply, interrupted=True)
        if self.runtime.store is not None and self._started:
            self.runtime.store.close_conversation(self.conversation_id, utc_now())
        logger.info("call %s ended", self.conversation_id)

    def end_call(self, message: str = "") -> None:
        """Say ``message`` (if any), then close the stream."""
        if message:
            self._speak_canned(message)
        with self._lock:
            self._close_message = message or "call ended"
            self._lock.notify_all()

    @property
    def idle(self) -> bool:
        """Nothing being said or prepared, and every update handed out."""
        with self._lock:
            return self._reply is None and not self._frames and not self._outputs

    # ------------------------------------------------------------------ playback

    def _next_due(self) -> float:
        assert self._play_t0 is not None
        return self._play_t0 + self._play_count * FRAME_S - PLAYBACK_LEAD_S

    def _pop_frame(self, now: float) -> tuple[int, Samples]:
        frame = self._frames.popleft()
        self._play_count += 1
        reply = frame.reply
        if frame.chunk.played == 0:  # a new chunk starts playing: its text is the caption
            self._caption(reply, frame.chunk)
        frame.chunk.played += frame.samples.size
        if reply.first_audio_t is None:
            reply.first_audio_t = now
            if reply.turn is not None and reply.speech_end_t is not None:
                reply.turn.timings.v2v_ms = (now - reply.speech_end_t) * 1000
                # The user's bubble appears with the answer: until then the turn may still
                # merge with speech that follows.
                self._publish(reply.turn, final=False)
        reply.last_frame_t = now
        self._lock.notify_all()
        return OUTPUT_RATE, frame.samples

    def _agent_audible(self) -> bool:
        """The agent is talking: audio is queued, or a reply that has started playing is
        still being produced (between two chunks, the next one still in TTS)."""
        if self._frames:
            return True
        reply = self._reply
        return reply is not None and reply.first_audio_t is not None and reply.producing

    def _push_audio(self, reply: _Reply, chunk: _Chunk, samples: Samples) -> bool:
        """Queue synthesized audio as 20 ms frames; False once the reply is cancelled."""
        with self._lock:
            if reply.cancel.is_set() or self._closed:
                return False
            for start in range(0, samples.size, FRAME_SAMPLES):
                piece = samples[start : start + FRAME_SAMPLES]
                if piece.size < FRAME_SAMPLES:
                    piece = np.pad(piece, (0, FRAME_SAMPLES - piece.size))
                self._frames.append(_Frame(reply, chunk, piece))
                chunk.pushed += piece.size
            self._lock.notify_all()
        return True

    def _finish_replies_locked(self) -> None:
        # Called with the (reentrant) lock held once everything queued has been played.
        reply = self._reply
        if reply is not None and not reply.producing and not reply.finished:
            self._finalize(reply, interrupted=False)

    # ------------------------------------------------------------------ turn events

    def _wall_time(self, sample: int) -> float:
        """When the frame holding ``sample`` arrived."""
        for end_sample, t in self._frame_times:
            if end_sample >= sample:
                return t
        return self._clock()

    def _on_speech_started(self) -> None:
        # The user talks again before the agent said anything: the last turn was not over
        # (a mid-sentence pause). Drop the pending reply and carry its audio into this turn.
        with self._lock:
            self._status("user_speaking")
            reply = self._reply
            pending = reply is not None and reply.producing and reply.first_audio_t is None
        if pending and reply is not None and reply.turn is not None:
            logger.debug("speech resumed before the reply started: merging turns")
            reply.cancel.set()
            with self._lock:
                reply.finished = True
                self._reply = None
                if reply.turn.sequence and reply.turn.sequence == self._sequence:
                    self._sequence -= 1  # the merged turn takes this number
            self._carry_audio = reply.user_audio

    def _on_end_candidate(self, event: EndCandidate) -> None:
        stack = self._stack
        audio = self._with_carry(event.audio)
        future: Future[str] = Future()

        def run() -> None:
            try:
                future.set_result(
                    stack.transcriber.transcribe((VAD_SAMPLE_RATE, audio), stack.persona.language)
                )
            except BaseException as e:
                future.set_exception(e)

        threading.Thread(target=run, name="stt-speculative", daemon=True).start()
        self._speculative = (event.speech_end_sample, future)

    def _with_carry(self, audio: Samples) -> Samples:
        if self._carry_audio is None:
            return audio
        return np.concatenate((self._carry_audio, audio))

    def _on_barge_in(self, event: BargeIn) -> None:
        """Silence the agent at once; stop it for good unless this may be a backchannel."""
        start_t = self._wall_time(event.start_sample)
        may_be_backchannel = self.runtime.turn_config.backchannel_max_ms > 0
        with self._lock:
            reply = self._reply
            # Already paused (its frames are kept, so the agent still counts as speaking):
            # keep the first measurement rather than timing a later utterance.
            if reply is None or not self._agent_audible() or self._paused is reply:
                return
            stop_t = reply.last_frame_t if reply.last_frame_t is not None else self._clock()
            if reply.turn is not None:
                reply.turn.timings.bargein_stop_ms = max(0.0, (stop_t - start_t) * 1000)
            self._paused = reply
            self._status("paused")
            if not may_be_backchannel:
                self._stop_paused_reply("barge-in")
        logger.debug("barge-in: agent paused")

    def _pause_for_overlap(self) -> None:
        """Pause the agent if it is still talking, so the utterance is judged as an overlap."""
        if self.runtime.turn_config.backchannel_max_ms <= 0:
            return
        with self._lock:
            if self._paused is None and self._reply is not None and self._agent_audible():
                self._paused = self._reply

    def _stop_paused_reply(self, why: str) -> None:
        """The user really interrupted: drop the rest of the reply and record what was heard."""
        with self._lock:
            reply, self._paused = self._paused, None
            if reply is None:
                return
            reply.cancel.set()
            self._frames.clear()
            # Under the lock, so emit() cannot record the reply as completed meanwhile.
            self._finalize(reply, interrupted=True)
        clear_queue = self._clear_queue
        if clear_queue is not None:
            clear_queue()  # what FastRTC already holds for the client
        if self.on_interrupt is not None:
            self.on_interrupt()
        logger.info("barge-in (%s): agent stopped", why)

    def _resume_paused_reply(self, heard: str) -> None:
        with self._lock:
            reply, self._paused = self._paused, None
            self._status("speaking")
            if reply is not None and reply.turn is not None:
                reply.turn.timings.bargein_stop_ms = None
            self._lock.notify_all()
        logger.info("backchannel: agent goes on")

    def _settle_pause(self, event: UserTurn, closed_t: float) -> None:
        """The overlapping utterance ended: a backchannel resumes the agent, anything else is a
        turn of its own (its transcript is reused)."""
        stack = self._stack
        persona = stack.persona
        audio = event.audio
        # The turn's audio starts with the pre-roll: the speech itself is that much shorter.
        pre_roll_s = self.runtime.turn_config.pre_roll_ms / 1000
        duration_s = max(
            0.0, (event.speech_end_sample - event.start_sample) / VAD_SAMPLE_RATE - pre_roll_s
        )
        # The early transcription of this very utterance, if one is under way: the agent
        # stays silent until we know, so do not transcribe twice.
        early = self._speculative
        self._speculative = None
        future: Future[str] = Future()

        def classify() -> None:
            try:
                if early is not None and early[0] == event.speech_end_sample:
                    text = early[1].result()
                else:
                    text = stack.transcriber.transcribe((VAD_SAMPLE_RATE, audio), persona.language)
            except Exception as e:
                future.set_exception(e)
                self._stop_paused_reply("unintelligible")
                self._on_user_turn(event, closed_t, transcript=future)
                return
            future.set_result(text)
            if is_backchannel(text, duration_s, persona.backchannels, persona.language):
                self._resume_paused_reply(text)
            else:
                self._stop_paused_reply("the user took the turn")
                self._on_user_turn(event, closed_t, transcript=future)

        threading.Thread(target=classify, name="backchannel", daemon=True).start()

    def _on_user_turn(
        self, event: UserTurn, closed_t: float, transcript: Future[str] | None = None
    ) -> None:
        audio = self._with_carry(event.audio)
        if transcript is not None and self._detector.speaking:
            # Judged after the overlap ended, and the user is already talking again ("Wait,
            # ... let me stop you there"): not a turn of its own, the start of the next one.
            self._carry_audio = audio
            logger.debug("the interruption goes on: carrying it into the next turn")
            return
        speech_end_t = self._wall_time(event.speech_end_sample)
        self._carry_audio = None
        speculative = transcript
        if self._speculative is not None and self._speculative[0] == event.speech_end_sample:
            speculative = speculative or self._speculative[1]
        self._speculative = None
        with self._lock:
            previous = self._reply
        if previous is not None and not previous.finished:
            previous.cancel.set()
            with self._lock:
                self._frames.clear()
            self._finalize(previous, interrupted=True)
        stack = self._stack
        turn = Turn(
            conversation_id=self.conversation_id,
            sequence=0,  # numbered once the transcript shows it is a real turn
            user_text="",
            timings=Timings(endpoint_ms=(closed_t - speech_end_t) * 1000),
            stt_model=stack.transcriber.name,
            llm_model=stack.chat.name,
            tts_model=stack.synthesizer.name,
        )
        reply = _Reply(
            turn=turn,
            joiner=_joiner(stack),
            speech_end_t=speech_end_t,
            closed_t=closed_t,
            user_audio=audio,
        )
        with self._lock:
            self._reply = reply
            self._status("thinking")
        threading.Thread(
            target=self._run_reply,
            args=(reply, stack, audio, speculative),
            name="reply",
            daemon=True,
        ).start()

    # ------------------------------------------------------------------ the reply pipeline

    def _run_reply(
        self, reply: _Reply, stack: PersonaStack, audio: Samples, speculative: Future[str] | None
    ) -> None:
        turn = reply.turn
        assert turn is not None
        persona = stack.persona
        try:
            if speculative is not None:
                text = speculative.result()
            else:
                text = stack.transcriber.transcribe((VAD_SAMPLE_RATE, audio), persona.language)
            # From the turn's close: an early (speculative or barge-in) transcription counts
            # only for the part the user actually waited for.
            turn.timings.stt_ms = (self._clock() - (reply.closed_t or self._clock())) * 1000
        except Exception as e:  # a bug in a stage must not end the call either
            if isinstance(e, StageError):
                logger.error("transcription failed: %s", e)
            else:
                logger.exception("transcription failed")
            turn.error = str(e) if isinstance(e, StageError) else f"stt: {e}"
            with self._lock:
                self._sequence += 1
                turn.sequence = self._sequence
            self._speak_into(reply, stack, [persona.apology])
            return
        turn.user_text = text.strip()
        with self._lock:
            if not turn.user_text or reply.cancel.is_set():
                reply.producing = False
                reply.finished = True
                if self._reply is reply:
                    self._reply = None
                    self._status("listening")
                logger.debug("empty transcript or superseded turn: no reply")
                return
            self._sequence += 1
            turn.sequence = self._sequence
        messages = build_messages(
            persona.system_prompt, self.history, turn.user_text, persona.history_turns * 2
        )
        self._speak_into(reply, stack, self._llm_chunks(reply, stack, messages))

    def _llm_chunks(self, reply: _Reply, stack: PersonaStack, messages: list[Message]) -> Any:
        """Speakable chunks from the LLM stream; on failure, the persona's apology."""
        turn = reply.turn
        assert turn is not None
        chunker = Chunker(language=stack.persona.language)
        sent = self._clock()
        stream = stack.chat.stream(messages)
        try:
            for token in stream:
                if reply.cancel.is_set():
                    break
                if turn.timings.llm_ttft_ms is None:
                    turn.timings.llm_ttft_ms = (self._clock() - sent) * 1000
                chunks = chunker.feed(token)
                if chunks and turn.timings.llm_first_chunk_ms is None:
                    turn.timings.llm_first_chunk_ms = (self._clock() - sent) * 1000
                yield from chunks
            else:
                chunks = chunker.flush()  # a one-chunk reply only completes here
                if chunks and turn.timings.llm_first_chunk_ms is None:
                    turn.timings.llm_first_chunk_ms = (self._clock() - sent) * 1000
                yield from chunks
        except StageError as e:
            logger.error("turn %d: %s", turn.sequence, e)
            turn.error = str(e)
            yield from chunker.flush()
            yield stack.persona.apology
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # cancels the HTTP request when we stopped early

    def _speak_into(self, reply: _Reply, stack: PersonaStack, chunks: Any) -> None:
        """Synthesize chunks on a TTS thread while ``chunks`` keeps producing (pipelined)."""
        pending: queue.Queue[_Chunk | None] = queue.Queue(maxsize=32)
        synthesizer = stack.synthesizer

        def synthesize() -> None:
            while (chunk := pending.get()) is not None:
                if reply.cancel.is_set():
                    continue
                ready = self._clock()
                try:
                    for rate, samples in synthesizer.synthesize(chunk.text):
                        if reply.turn is not None and reply.turn.timings.tts_first_ms is None:
                            reply.turn.timings.tts_first_ms = (self._clock() - ready) * 1000
                        if not self._push_audio(reply, chunk, resample(samples, rate, OUTPUT_RATE)):
                            break
                except Exception as e:
                    logger.error("tts failed on %r: %s", chunk.text[:40], e)
                    if reply.turn is not None and reply.turn.error is None:
                        reply.turn.error = str(e) if isinstance(e, StageError) else f"tts: {e}"
                finally:
                    chunk.done = True

        worker = threading.Thread(target=synthesize, name="tts", daemon=True)
        worker.start()
        try:
            for text in chunks:
                if reply.cancel.is_set():
                    break
                chunk = _Chunk(text)
                with self._lock:
                    reply.chunks.append(chunk)
                pending.put(chunk)
        except Exception:
            logger.exception("reply generation failed")
        finally:
            pending.put(None)
            worker.join()
            with self._lock:
                reply.producing = False
                self._lock.notify_all()

    def _speak_canned(self, text: str) -> None:
        """Speak a fixed line (greeting, goodbye) outside any user turn."""
        reply = _Reply(turn=None, joiner=_joiner(self._stack))
        with self._lock:
            self._reply = reply
        stack = self._stack
        threading.Thread(
            target=self._speak_into,
            args=(reply, stack, [text]),
            name="canned",
            daemon=True,
        ).start()

    # ------------------------------------------------------------------ bookkeeping

    def _finalize(self, reply: _Reply, *, interrupted: bool) -> None:
        """Record what was actually played, once per reply."""
        with self._lock:
            if reply.finished:
                return
            reply.finished = True
            if self._reply is reply:
                self._reply = None
            played = reply.played_text()
            if reply.caption is not None:
                self._outputs.append(
                    TurnUpdate(
                        replace(reply.caption, assistant_text=played, interrupted=interrupted),
                        final=True,
                    )
                )
            self._status("listening")
        turn = reply.turn
        if turn is None:  # the greeting
            if played:
                self.history.append(Message("assistant", played))
            return
        if not turn.user_text and turn.error is None:
            return
        turn.assistant_text = played
        turn.interrupted = interrupted
        turn.ended_at = utc_now()
        self.history.extend(turn.history_messages())
        self.completed_turns.append(turn)
        if self.runtime.store is not None:
            self.runtime.store.record(turn)
        if self.observer is not None:
            try:
                self.observer.turn_finished(turn, self.channel_kind)
            except Exception:  # metrics must never end a call
                logger.exception("turn observer failed")
        self._publish(turn, final=True)

    def _publish(self, turn: Turn, *, final: bool) -> None:
        with self._lock:
            self._outputs.append(TurnUpdate(replace(turn, timings=replace(turn.timings)), final))
            if final and turn.error:
                self._status("error", turn.error)
            self._lock.notify_all()

    def _status(self, state: CallState, detail: str | None = None) -> None:
        with self._lock:  # only changes reach the page
            if self._last_status != (state, detail):
                self._last_status = (state, detail)
                self._outputs.append(CallStatus(state, detail))
                self._lock.notify_all()

    def _caption(self, reply: _Reply, chunk: _Chunk) -> None:
        # With the lock held: the chunks that have started playing, as the page's caption.
        started = [c.text for c in reply.chunks[: reply.chunks.index(chunk) + 1]]
        if reply.turn is None and reply.caption is None:
            reply.caption = Turn(self.conversation_id, 0, "", assistant_text="")
        turn = reply.turn or reply.caption
        assert turn is not None
        self._status("speaking")
        shown = replace(turn, assistant_text=reply.joiner.join(started))
        self._outputs.append(TurnUpdate(replace(shown, timings=replace(turn.timings)), False))


def _joiner(stack: PersonaStack) -> str:
    return "" if stack.persona.language == "ja" else " "
