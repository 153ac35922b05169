"""One call, independent of its transport: audio in, outputs out, one thread deciding.

A transport (FastRTC's WebRTC or websocket, our Twilio loop, ``voicebot simulate``) drives a
``Call`` through four methods: ``receive`` each input frame, take ``next_output`` (agent audio
when due, page updates, the hang-up), ``end`` it with last words, ``shutdown`` it when the
line is gone. Threads, per call:

- the transport's input thread runs ``receive``: resampling and the turn detector (VAD), then
  one ``AudioIn`` event onto the policy's queue;
- the transport's output thread runs ``next_output``: the playout's frames at playback pace;
- ``call-policy``: the only thread that decides (see ``policy``), consuming the one queue;
- ``stt``: one transcription at a time (see ``transcription``);
- per reply in flight, ``reply-N-llm`` and ``reply-N-tts`` (see ``reply``); a cancelled
  reply's threads end at their next token or piece of audio.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable

from voicebot.audio import Audio, StreamResampler, to_mono_float32
from voicebot.call.clock import Clock, RealClock
from voicebot.call.events import (
    AudioIn,
    AudioOut,
    CallEvent,
    CallOutput,
    EndRequested,
    HangUp,
    Tick,
)
from voicebot.call.mailbox import Closed, Mailbox
from voicebot.call.playout import OUTPUT_RATE, Playout
from voicebot.call.policy import CallPolicy
from voicebot.call.record import CallObserver, CallSetup
from voicebot.call.reply import ReplyStages
from voicebot.call.transcription import TranscriptionWorker
from voicebot.conversation import Channel, Message, Turn
from voicebot.errors import StageError
from voicebot.runtime import PersonaStack, Runtime
from voicebot.tools.registry import bind_tools
from voicebot.turns import TurnDetector
from voicebot.vad import VAD_SAMPLE_RATE

logger = logging.getLogger(__name__)

TICK_S = 0.5
"""How often the policy checks that the transport is still there."""
INBOX_EVENTS = 4096
"""Bound on the policy's queue (about 80 s of input frames): a stuck policy stops input."""
SHUTDOWN_WAIT_S = 5.0


class Call:
    """One conversation with a caller."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        channel: Channel = "web",
        persona: str | None = None,
        conversation_id: uuid.UUID | None = None,
        history: list[Message] | None = None,
        sequence_start: int = 0,
        greet: bool = True,
        clock: Clock | None = None,
        caller_ref: str | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self.runtime = runtime
        self.channel: Channel = channel
        self.persona_name = persona or runtime.default_persona
        self.conversation_id = conversation_id or uuid.uuid4()
        self.history: list[Message] = list(history or [])
        self.sequence_start = sequence_start
        self.greet = greet
        self.clock: Clock = clock or RealClock()
        self.caller_ref = caller_ref
        """Stored on the conversation: a salted hash of the caller's number, never the number."""
        self.observer = observer
        self.on_interrupt: Callable[[], None] | None = None
        """Called (on the policy thread) when the agent is stopped mid-reply: the transport
        drops the audio it still holds for the client."""
        self.on_end: Callable[[], None] | None = None
        """Called once (on the policy thread) when the call has ended, however it ended."""
        self.alive: Callable[[], bool] | None = None
        """Asked every ``TICK_S``: False when the transport is gone (a closed websocket)."""
        self._stack: PersonaStack = runtime.stack(self.persona_name)
        self._detector = TurnDetector(
            runtime.turn_config, runtime.vad.stream(), runtime.turn_end, runtime.turn_end_executor
        )
        self._inbox: Mailbox[CallEvent] = Mailbox(self.clock, INBOX_EVENTS)
        self._out = self.clock.condition()
        self._outbox: deque[CallOutput] = deque()
        self.playout = Playout(self._out, self._post)
        self._policy: CallPolicy | None = None
        self._start_lock = threading.Lock()
        self._ended = threading.Event()
        self._policy_thread: int | None = None
        self._receive_errors = 0
        self._to_vad_rate: StreamResampler | None = None  # the input thread's only
        self._turn_events_sent = 0  # written by the input thread only
        self._turn_events_seen = 0  # written by the policy thread only

    # ------------------------------------------------------------------ before the call starts

    def set_persona(self, name: str) -> None:
        """Switch persona (only before the call has started)."""
        if name not in self.runtime.stacks:
            logger.warning("unknown persona %r; keeping %s", name, self.persona_name)
            return
        self.persona_name = name
        self._stack = self.runtime.stack(name)

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
        self.sequence_start = max((t.sequence for t in turns), default=0)

    # ------------------------------------------------------------------ the transport's side

    @property
    def started(self) -> bool:
        return self._policy is not None

    def start(self) -> None:
        """Open the conversation and speak the greeting (once; later calls do nothing)."""
        with self._start_lock:
            if self._policy is not None:
                return
            setup = CallSetup(
                runtime=self.runtime,
                stack=self._stack,
                conversation_id=self.conversation_id,
                channel=self.channel,
                history=self.history,
                sequence_start=self.sequence_start,
                greet=self.greet,
                caller_ref=self.caller_ref,
            )
            self._policy = CallPolicy(
                setup,
                clock=self.clock,
                playout=self.playout,
                transcription=TranscriptionWorker(self.clock, self._post),
                stages=ReplyStages(
                    self.clock,
                    self.playout,
                    self._post,
                    bind_tools(
                        self._stack.persona,
                        self.conversation_id,
                        reservations=self.runtime.reservations,
                        clock=self.runtime.wall_clock,
                    ),
                ),
                publish=self._publish,
                interrupt=self._interrupted,
                observer=self.observer,
            )
        self.clock.start_thread(self._run, "call-policy")

    def receive(self, frame: Audio) -> None:
        """Take one input frame (any rate, int16 or float, mono or stereo)."""
        try:
            self._receive(frame)
        except Closed:
            pass  # the call is over
        except Exception:
            # One bad frame or a bug in a stage must not end the call: log it once per call.
            self._receive_errors += 1
            if self._receive_errors == 1:
                logger.exception("call %s: dropping an input frame", self.conversation_id)

    def _receive(self, frame: Audio) -> None:
        if self._policy is None:
            self.start()
        policy = self._policy
        if policy is None or policy.ended:
            return
        try:
            rate, samples = to_mono_float32(frame)
        except ValueError as e:
            self._receive_errors += 1
            if self._receive_errors == 1:
                logger.warning("call %s: dropping input frames: %s", self.conversation_id, e)
            return
        if self._to_vad_rate is None or self._to_vad_rate.from_rate != rate:
            self._to_vad_rate = StreamResampler(rate, VAD_SAMPLE_RATE)
        samples = self._to_vad_rate(samples)
        now = self.clock.now()
        agent_speaking = self.playout.queued() > 0 or policy.talking
        events = self._detector.push(samples, agent_speaking=agent_speaking)
        detector = self._detector
        if events:
            self._turn_events_sent += 1
        self._inbox.put(
            AudioIn(
                now,
                detector.samples_seen,
                detector.utterance_samples,
                detector.speaking,
                tuple(events),
            )
        )

    def next_output(self, wait_s: float) -> CallOutput | None:
        """The next output, waiting up to ``wait_s`` for one: a page update, 20 ms of agent
        audio when it is due, or the hang-up."""
        clock = self.clock
        deadline = clock.now() + wait_s
        with self._out:
            while True:
                now = clock.now()
                item, due_in = self._next_locked(now)
                if item is not None:
                    return item
                wait = deadline - now if due_in is None else min(due_in, deadline - now)
                if wait <= 0 or self._ended.is_set():
                    return None
                self._out.wait(wait)

    def poll_output(self) -> CallOutput | None:
        """The next output that is due now, without waiting."""
        with self._out:
            return self._next_locked(self.clock.now())[0]

    def _next_locked(self, now: float) -> tuple[CallOutput | None, float | None]:
        if self._outbox:
            return self._outbox.popleft(), None
        frame, due_in = self.playout.take_locked(now)
        if frame is not None:
            return AudioOut(OUTPUT_RATE, frame), None
        return None, due_in

    def end(self, message: str = "") -> None:
        """Say ``message`` (if any), then close: the reply in flight is stopped and recorded
        first. The call's end runs once."""
        self._post(EndRequested(message))

    def shutdown(self, reason: str = "hung up") -> None:
        """End the call now: the turn in flight is recorded as interrupted with what was
        heard, the conversation gets its end time, the threads stop. Idempotent, any thread."""
        if self._policy is None:
            with self._start_lock:
                if self._policy is None:  # never started: nothing to end
                    self._ended.set()
                    return
        self._post(HangUp(reason))
        if threading.get_ident() == self._policy_thread:
            return  # from the policy thread itself (an end hook): it ends right after
        if not self._ended.wait(SHUTDOWN_WAIT_S):
            logger.error(
                "call %s: the policy did not end within %.0f s",
                self.conversation_id,
                SHUTDOWN_WAIT_S,
            )

    def idle(self) -> bool:
        """Nothing is being said or prepared, and every update was handed out."""
        policy = self._policy
        with self._out:
            if self._outbox:
                return False
        if self.playout.queued() > 0:
            return False
        if policy is None:
            return True
        if self._detector.speaking or self._turn_events_seen != self._turn_events_sent:
            return False  # the caller is talking, or the policy has yet to hear what they said
        return policy.idle()

    @property
    def completed_turns(self) -> list[Turn]:
        """Turns recorded so far, in order."""
        return self._policy.record.completed_turns if self._policy is not None else []

    @property
    def state(self) -> str:
        return self._policy.state if self._policy is not None else "listening"

    @property
    def wasted_llm_requests(self) -> int:
        """Preemptive replies dropped after their LLM request was sent (the user went on)."""
        return self._policy.wasted_llm_requests if self._policy is not None else 0

    @property
    def preemptive_played(self) -> int:
        """Turns answered by the reply prepared at their last pause."""
        return self._policy.preemptive_played if self._policy is not None else 0

    @property
    def preemptive_head_start_ms(self) -> float:
        """Summed over those turns: how long their LLM had been asked when the turn closed."""
        return self._policy.preemptive_head_start_ms if self._policy is not None else 0.0

    # ------------------------------------------------------------------ inside

    def _post(self, event: CallEvent) -> None:
        try:
            self._inbox.put(event)
        except Closed:
            pass  # the call has ended: nothing listens any more

    def _publish(self, output: CallOutput) -> None:
        with self._out:
            self._outbox.append(output)
            self._out.notify_all()

    def _interrupted(self) -> None:
        if self.on_interrupt is not None:
            try:
                self.on_interrupt()
            except Exception:
                logger.exception(
                    "call %s: the transport could not drop its audio", self.conversation_id
                )

    def _run(self) -> None:
        policy = self._policy
        assert policy is not None
        self._policy_thread = threading.get_ident()
        try:
            policy.open()
            next_tick = self.clock.now() + TICK_S
            while not policy.ended:
                timeout = next_tick - self.clock.now()
                event = self._inbox.get(timeout=timeout) if timeout > 0 else None
                if event is not None:
                    policy.handle(event)
                    if isinstance(event, AudioIn) and event.turn_events:
                        self._turn_events_seen += 1
                now = self.clock.now()
                if now >= next_tick and not policy.ended:
                    next_tick = now + TICK_S
                    alive = self.alive
                    gone = alive is not None and not alive()
                    policy.handle(HangUp("the transport closed") if gone else Tick(now))
        except Closed:
            pass
        except Exception:
            logger.exception("call %s: the policy failed; ending the call", self.conversation_id)
            policy.end("error")
        finally:
            self._inbox.close()
            self._ended.set()
            with self._out:
                self._out.notify_all()
            if self.on_end is not None:
                try:
                    self.on_end()
                except Exception:
                    logger.exception("call %s: end hook failed", self.conversation_id)
