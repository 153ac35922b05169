"""The turn-taking policy: an explicit state machine, run by one thread over one event queue.

States (``CallStatus.state``): ``listening`` → ``user_speaking`` → ``thinking`` (a reply is
being prepared) → ``speaking`` → ``listening``; ``paused`` while the caller talks over the
agent and we find out whether it was only a backchannel; ``closing`` once the call ends.
Every input is an event (see ``events``); every field here is read and written only by the
policy thread, so no two decisions can race. The only shared state is what the playout,
the transcription worker and the reply stages own, each behind its own lock.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from voicebot.acknowledgement import ANSWER_HEAD_START_S
from voicebot.audio import Samples
from voicebot.backchannel import is_backchannel
from voicebot.call.clock import Clock
from voicebot.call.events import (
    AcknowledgementDue,
    AudioIn,
    CallEvent,
    CallOutput,
    ChunkPlaying,
    ChunkReady,
    CloseCall,
    EndRequested,
    HangUp,
    PlayoutDrained,
    ReplyProduced,
    StageFailed,
    Tick,
    ToolDone,
    ToolRunning,
    Transcribed,
)
from voicebot.call.playout import LEAD_IN, Playout, played_text
from voicebot.call.record import CallObserver, CallSetup, ConversationRecord
from voicebot.call.reply import Reply, ReplyStages
from voicebot.call.status import CallState, CallStatus
from voicebot.call.transcription import TranscriptionWorker
from voicebot.conversation import Timings, Turn, utc_now
from voicebot.errors import StageError
from voicebot.llm import build_messages
from voicebot.stt import same_words
from voicebot.turns import BargeIn, EndCandidate, SpeechResumed, SpeechStarted, UserTurn
from voicebot.vad import VAD_SAMPLE_RATE

logger = logging.getLogger(__name__)


@dataclass
class _Overlap:
    """Speech over the agent, being transcribed to tell a backchannel from a real turn."""

    request: int
    turn: UserTurn
    closed_t: float
    duration_s: float


@dataclass
class _Preemptive:
    """A reply started at an end candidate, its audio held until the turn is confirmed."""

    reply: Reply
    speech_end_sample: int
    request: int
    """The early transcription it answers."""
    carry_samples: int
    """Audio of an earlier turn carried into this one when it started."""
    history_len: int
    answered_at: float | None = None
    """When its LLM request was sent (a drop then wastes it)."""
    draft_asked: bool = False
    """Its transcription was asked for a draft first."""
    draft: str | None = None
    """The draft transcript its LLM request was made from, until the transcript agrees
    (then None): it cannot play before that."""
    closed: bool = False
    """The turn closed at its pause and waits for the transcript to settle the words."""


class CallPolicy:
    """Decides what the call does next. ``handle`` is called by the policy thread only."""

    def __init__(
        self,
        setup: CallSetup,
        *,
        clock: Clock,
        playout: Playout,
        transcription: TranscriptionWorker,
        stages: ReplyStages,
        publish: Callable[[CallOutput], None],
        interrupt: Callable[[], None],
        observer: CallObserver | None = None,
    ) -> None:
        self._setup = setup
        self._clock = clock
        self._playout = playout
        self._stt = transcription
        self._stages = stages
        self._publish = publish
        self._interrupt = interrupt
        self._config = setup.runtime.turn_config
        self._stack = setup.stack
        self.record = ConversationRecord(setup, publish, observer)
        self.state: CallState = "listening"
        self._error_over: CallState | None = None  # the state an error status stands in for
        self._reply: Reply | None = None  # the reply the caller hears, or will hear next
        self._replies: dict[int, Reply] = {}  # every reply whose stages may still report
        self._reply_ids = itertools.count(1)
        self._paused = False
        self._announced = False  # the current utterance gave SpeechStarted or BargeIn
        self._carry_audio: Samples | None = None
        self._speculative: tuple[int, int] | None = None  # (speech end sample, request)
        self._early: dict[int, Transcribed] = {}  # speculative results not yet used
        self._overlap: _Overlap | None = None
        self._preemptive: _Preemptive | None = None
        self.wasted_llm_requests = 0
        """Preemptive replies whose LLM request was sent and which were then dropped."""
        self.preemptive_played = 0
        """Turns answered by their preemptive reply."""
        self.preemptive_head_start_ms = 0.0
        """Summed over those turns: how long their LLM had been asked when the turn closed
        (what the reply had done that a reply started at the close would still have to do)."""
        self._frame_times: deque[tuple[int, float]] = deque(maxlen=512)
        self._user_speaking = False
        self._closing_message: str | None = None
        self._acknowledged: dict[int, str] = {}  # reply → its acknowledgement ("": had one)
        self._carry_acknowledged = False  # the carried audio's turn already had one
        self.closing = False
        self.ended = False
        self.talking = False
        """A reply has started playing and is still being produced (read by the transport
        thread: the turn detector counts speech over it as a barge-in)."""

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Open the conversation and speak the greeting."""
        setup = self._setup
        persona = self._stack.persona
        self.record.open()
        logger.info("call %s started with persona %s", setup.conversation_id, persona.name)
        self._publish(CallStatus(self.state))
        if setup.greet and persona.greeting and not self.record.history:
            greeting = self._new_reply(turn=None)
            greeting.caption = Turn(setup.conversation_id, 0, "")
            self._reply = greeting
            self._stages.say(greeting, self._stack, [persona.greeting])
            self._refresh_state()

    def end(self, reason: str) -> None:
        """The call's end, run once: the turn in flight is recorded as interrupted with
        what was heard, the conversation gets its end time, the workers stop."""
        if self.ended:
            return
        self.ended = True
        self.closing = True
        self._overlap = None
        self._drop_preemptive("the call ended")
        for reply in list(self._replies.values()):
            if not reply.finished:
                reply.cancel()
                self._finalize(reply, interrupted=True)
        self._playout.clear()
        self._stt.close()
        self.record.close()
        logger.info("call %s ended (%s)", self._setup.conversation_id, reason)
        self._refresh_state()

    def idle(self) -> bool:
        """No reply in flight and no overlap being judged."""
        return (
            self._reply is None
            and self._overlap is None
            and not self._paused
            and self._preemptive is None
        )

    # ------------------------------------------------------------------ events

    def handle(self, event: CallEvent) -> None:
        if self.ended:
            return
        if isinstance(event, AudioIn):
            self._on_audio(event)
        elif isinstance(event, Transcribed):
            self._on_transcribed(event)
        elif isinstance(event, ChunkReady):
            reply = self._replies.get(event.reply)
            if reply is not None:
                reply.texts.append(event.text)
        elif isinstance(event, ChunkPlaying):
            self._on_chunk_playing(event)
        elif isinstance(event, PlayoutDrained):
            self._maybe_done(event.reply)
        elif isinstance(event, ReplyProduced):
            reply = self._replies.get(event.reply)
            if reply is not None:
                reply.produced = True
                self._maybe_done(event.reply)
        elif isinstance(event, StageFailed):
            self._on_stage_failed(event)
        elif isinstance(event, ToolRunning | ToolDone):
            self._on_tool(event)
        elif isinstance(event, AcknowledgementDue):
            self._on_acknowledgement_due(event)
        elif isinstance(event, EndRequested):
            self._on_end_requested(event.message)
        elif isinstance(event, HangUp):
            self.end(event.reason)
        elif isinstance(event, Tick):
            pass
        self._refresh_state()

    def _on_audio(self, event: AudioIn) -> None:
        self._frame_times.append((event.samples_seen, event.at))
        self._user_speaking = event.speaking
        if self.closing:
            return  # the goodbye plays to the end
        config = self._config
        # utterance_samples also counts the trailing silence that has not closed the turn yet:
        # a 1.1 s 「なるほどですね」 must not count as 1.4 s of speech.
        limit = (config.backchannel_max_ms + config.end_silence_ms) * VAD_SAMPLE_RATE // 1000
        if self._paused and event.utterance_samples > limit:
            self._stop_paused("speech too long for a backchannel")
        for turn_event in event.turn_events:
            if isinstance(turn_event, BargeIn):
                self._announced = True
                self._on_barge_in(turn_event)
            elif isinstance(turn_event, EndCandidate):
                self._on_end_candidate(turn_event)
            elif isinstance(turn_event, SpeechResumed):
                self._drop_preemptive("the user went on")
            elif isinstance(turn_event, UserTurn):
                announced, self._announced = self._announced, False
                if not announced:
                    # Began while the agent talked, too short for a barge-in (a brief うん, a
                    # cough): judge it like any overlap instead of dropping the reply for it.
                    self._pause_for_overlap()
                if self._paused:
                    self._settle_pause(turn_event, event.at)
                else:
                    self._on_user_turn(turn_event, event.at)
            elif isinstance(turn_event, SpeechStarted):
                self._announced = True
                self._on_speech_started()

    # ------------------------------------------------------------------ the caller speaks

    def _wall_time(self, sample: int) -> float:
        """When the frame holding ``sample`` arrived."""
        for end_sample, t in self._frame_times:
            if end_sample >= sample:
                return t
        return self._clock.now()

    def _audible(self) -> bool:
        """The agent is talking: audio is queued, or a reply that has started playing is
        still being produced (between two chunks, the next one still in TTS)."""
        return self._playout.queued() > 0 or self.talking

    def _on_speech_started(self) -> None:
        # The user talks again before the agent said anything: the last turn was not over
        # (a mid-sentence pause). Drop the pending reply and carry its audio into this turn.
        # A preemptive answer still held (its draft not checked yet) answered that pause:
        # it can no longer play, so its LLM stream and synthesis stop now, not at the next
        # pause.
        self._drop_preemptive("the user went on after the close")
        reply = self._reply
        if reply is None or reply.turn is None or reply.finished:
            return
        if reply.first_audio_at is not None:
            return
        if reply.tool_calls or reply.tool_running is not None:
            return  # the model already acted on this turn: it stays a turn of its own
        logger.debug("speech resumed before the reply started: merging turns")
        reply.cancel()
        self._playout.clear(reply.id)
        self._forget(reply)
        self._reply = None
        self.record.unnumber(reply.turn)
        self._carry_audio = reply.user_audio
        self._carry_acknowledged = self._acknowledged.pop(reply.id, None) is not None

    def _with_carry(self, audio: Samples) -> Samples:
        if self._carry_audio is None:
            return audio
        return np.concatenate((self._carry_audio, audio))

    def _stt_busy_for_a_decision(self) -> bool:
        reply = self._reply
        waiting = reply is not None and reply.stt_request is not None and not reply.finished
        return waiting or self._overlap is not None

    def _on_end_candidate(self, event: EndCandidate) -> None:
        """A pause that may end the turn: transcribe it early (replacing an earlier early
        pass), unless a decision is waiting for the transcriber."""
        self._drop_preemptive("a later pause")
        if self._stt_busy_for_a_decision():
            return
        audio = self._with_carry(event.audio)
        preempt = self._can_preempt()
        request = self._stt.request(
            audio,
            self._stack.transcriber,
            self._stack.persona.language,
            draft=preempt and self._config.stt_drafts,
        )
        self._speculative = (event.speech_end_sample, request)
        self._early.clear()
        if preempt:
            self._start_preemptive(event, audio, request, self._config.stt_drafts)

    def _on_barge_in(self, event: BargeIn) -> None:
        """Silence the agent at once; stop it for good unless this may be a backchannel."""
        reply = self._reply
        # Already paused (its frames are kept, so the agent still counts as speaking):
        # keep the first measurement rather than timing a later utterance.
        if reply is None or self._paused or not self._audible():
            return
        start_t = self._wall_time(event.start_sample)
        last_frame = self._playout.pause()
        stop_t = last_frame if last_frame is not None else self._clock.now()
        if reply.turn is not None:
            reply.turn.timings.bargein_stop_ms = max(0.0, (stop_t - start_t) * 1000)
        self._paused = True
        reply.state = "paused"
        if self._config.backchannel_max_ms <= 0:
            self._stop_paused("barge-in")
        logger.debug("barge-in: agent paused")

    def _pause_for_overlap(self) -> None:
        """Pause the agent if it is still talking, so the utterance is judged as an overlap."""
        if self._config.backchannel_max_ms <= 0:
            return
        reply = self._reply
        if not self._paused and reply is not None and self._audible():
            self._playout.pause()
            self._paused = True
            reply.state = "paused"

    def _stop_paused(self, why: str) -> None:
        """The user really interrupted: drop the rest of the reply and record what was heard."""
        if not self._paused:
            return
        self._paused = False
        reply = self._reply
        if reply is not None:
            reply.cancel()
            self._playout.clear(reply.id)
            self._finalize(reply, interrupted=True)
        else:
            self._playout.resume()
        self._interrupt()  # what the transport still holds for the client
        logger.info("barge-in (%s): agent stopped", why)

    def _resume_paused(self) -> None:
        self._paused = False
        reply = self._reply
        if reply is not None:
            reply.state = "speaking"
            if reply.turn is not None:
                reply.turn.timings.bargein_stop_ms = None
        self._playout.resume()
        logger.info("backchannel: agent goes on")

    def _settle_pause(self, event: UserTurn, closed_t: float) -> None:
        """The overlapping utterance ended: transcribe it to judge it (a backchannel resumes
        the agent, anything else is a turn of its own). A second overlap while the first is
        judged is judged together with it, on one transcription."""
        pre_roll_s = self._config.pre_roll_ms / 1000
        duration_s = max(
            0.0, (event.speech_end_sample - event.start_sample) / VAD_SAMPLE_RATE - pre_roll_s
        )
        previous = self._overlap
        speculative = self._speculative
        self._speculative = None
        if previous is not None:
            event = UserTurn(
                audio=np.concatenate((previous.turn.audio, event.audio)),
                start_sample=previous.turn.start_sample,
                speech_end_sample=event.speech_end_sample,
                closed_sample=event.closed_sample,
                truncated=event.truncated,
            )
            duration_s += previous.duration_s
            request = self._request_stt(event.audio)
        elif speculative is not None and speculative[0] == event.speech_end_sample:
            request = speculative[1]  # already being transcribed: do not do it twice
        else:
            request = self._request_stt(event.audio)
        self._overlap = _Overlap(request, event, closed_t, duration_s)
        early = self._early.pop(request, None)
        self._early.clear()
        if early is not None:
            self._judge(self._overlap, early)

    def _request_stt(self, audio: Samples) -> int:
        return self._stt.request(audio, self._stack.transcriber, self._stack.persona.language)

    def _judge(self, overlap: _Overlap, result: Transcribed) -> None:
        self._overlap = None
        persona = self._stack.persona
        if result.error is None and is_backchannel(
            result.text, overlap.duration_s, persona.backchannels, persona.language
        ):
            self._resume_paused()
            return
        self._stop_paused("unintelligible" if result.error is not None else "a turn of its own")
        self._on_user_turn(overlap.turn, overlap.closed_t, transcript=result, judged=True)

    def _on_transcribed(self, event: Transcribed) -> None:
        if event.draft:
            self._answer_preemptive(event)  # a draft only ever starts a preemptive answer
            return
        overlap = self._overlap
        reply = self._reply
        if overlap is not None and overlap.request == event.request:
            self._judge(overlap, event)
        elif reply is not None and reply.stt_request == event.request and not reply.finished:
            if not self._adopt_preemptive(reply, event):
                self._answer(reply, event)
        elif self._speculative is not None and self._speculative[1] == event.request:
            self._early[event.request] = event  # for the turn this pause may close
            self._answer_preemptive(event)
        else:
            logger.debug("dropping a superseded transcription")

    def _on_user_turn(
        self,
        event: UserTurn,
        closed_t: float,
        transcript: Transcribed | None = None,
        judged: bool = False,
    ) -> None:
        audio = self._with_carry(event.audio)
        if judged and self._user_speaking:
            # Judged after the overlap ended, and the user is already talking again ("Wait,
            # ... let me stop you there"): not a turn of its own, the start of the next one.
            self._carry_audio = audio
            logger.debug("the interruption goes on: carrying it into the next turn")
            return
        speech_end_t = self._wall_time(event.speech_end_sample)
        self._carry_audio = None
        request: int | None = None
        speculative = self._speculative
        if transcript is None and speculative is not None:
            if speculative[0] == event.speech_end_sample:
                transcript = self._early.get(speculative[1])
                request = None if transcript is not None else speculative[1]
        self._speculative = None
        self._early.clear()
        previous = self._reply
        if previous is not None and not previous.finished:
            previous.cancel()
            self._playout.clear(previous.id)
            self._finalize(previous, interrupted=True)
        if self._promote_preemptive(event, audio, speech_end_t, closed_t, judged):
            return
        stack = self._stack
        turn = Turn(
            conversation_id=self._setup.conversation_id,
            sequence=0,  # numbered once the transcript shows it is a real turn
            user_text="",
            timings=Timings(endpoint_ms=(closed_t - speech_end_t) * 1000),
            stt_model=stack.transcriber.name,
            llm_model=stack.chat.name,
            tts_model=stack.synthesizer.name,
        )
        reply = self._new_reply(turn, speech_end_t=speech_end_t, closed_t=closed_t, audio=audio)
        self._inherit_acknowledgement(reply)
        self._reply = reply
        if transcript is not None:
            self._answer(reply, transcript)
        else:
            reply.stt_request = request if request is not None else self._request_stt(audio)

    def _answer(self, reply: Reply, transcript: Transcribed) -> None:
        """The turn's transcript is in: number the turn and start the LLM and TTS stages."""
        turn = reply.turn
        assert turn is not None
        reply.stt_request = None
        persona = self._stack.persona
        # From the turn's close: an early (speculative or overlap) transcription counts only
        # for the part the user actually waited for.
        turn.timings.stt_ms = max(0.0, self._clock.now() - (reply.closed_t or 0.0)) * 1000
        if transcript.error is not None:
            e = transcript.error
            if isinstance(e, StageError):
                logger.error("transcription failed: %s", e)
            else:
                logger.error("transcription failed", exc_info=e)
            turn.error = str(e) if isinstance(e, StageError) else f"stt: {e}"
            self.record.number(turn)
            self._stages.say(reply, self._stack, [persona.apology])
            return
        turn.user_text = transcript.text.strip()
        if not turn.user_text:
            logger.debug("empty transcript: no reply")
            reply.cancel()
            self._forget(reply)
            self._reply = None
            return
        self.record.number(turn)
        messages = build_messages(
            persona.system_prompt_at(self._setup.runtime.wall_clock()),
            self.record.history,
            turn.user_text,
            persona.history_turns * 2,
        )
        self._stages.answer(reply, self._stack, messages)
        self._schedule_acknowledgement(reply)

    # ------------------------------------------------------------------ preemptive replies

    def _can_preempt(self) -> bool:
        """At most one preemptive reply per call; only when the agent is silent and nothing
        is being judged."""
        return (
            self._config.preemptive_replies
            and not self.closing
            and self._reply is None
            and not self._paused
            and self._overlap is None
        )

    def _start_preemptive(
        self, event: EndCandidate, audio: Samples, request: int, draft_asked: bool
    ) -> None:
        """At the first pause, prepare the answer with its audio held back: it is started
        when the early transcription (or its draft) comes, and plays at once if the turn ends
        at this pause."""
        stack = self._stack
        turn = Turn(
            conversation_id=self._setup.conversation_id,
            sequence=0,  # numbered when the turn is confirmed
            user_text="",
            stt_model=stack.transcriber.name,
            llm_model=stack.chat.name,
            tts_model=stack.synthesizer.name,
        )
        reply = self._new_reply(turn, audio=audio, held=True)
        self._playout.hold(reply.id)
        carry = self._carry_audio
        self._preemptive = _Preemptive(
            reply,
            event.speech_end_sample,
            request,
            carry_samples=0 if carry is None else carry.size,
            history_len=len(self.record.history),
            draft_asked=draft_asked,
        )

    def _answer_preemptive(self, transcript: Transcribed) -> None:
        """The early transcript or its draft is in: ask the LLM, held back until the turn is
        confirmed (and, for a draft, until the transcript says the same words)."""
        pre = self._preemptive
        if pre is None or pre.request != transcript.request:
            return
        if pre.answered_at is not None:
            if pre.draft is not None and not transcript.draft:
                self._check_draft(pre, transcript)
            return
        text = transcript.text.strip()
        if transcript.error is not None or not text:
            self._drop_preemptive("nothing to answer")  # the confirmed turn deals with it
            return
        reply = pre.reply
        assert reply.turn is not None
        reply.turn.user_text = text
        persona = self._stack.persona
        messages = build_messages(
            persona.system_prompt_at(self._setup.runtime.wall_clock()),
            self.record.history,
            text,
            persona.history_turns * 2,
        )
        pre.answered_at = self._clock.now()
        if transcript.draft:
            pre.draft = text
            if not pre.closed:
                reply.defer_synthesis()
        self._stages.answer(reply, self._stack, messages)

    def _check_draft(self, pre: _Preemptive, transcript: Transcribed) -> bool:
        """The transcript of the pause the preemptive reply answers a draft of: keep the
        reply if both say the same words (the turn keeps the transcript's text), else drop
        it. True when kept."""
        assert pre.draft is not None and pre.reply.turn is not None
        if transcript.error is not None or not same_words(pre.draft, transcript.text):
            self._drop_preemptive("the transcript differs from its draft")
            return False
        pre.draft = None
        pre.reply.turn.user_text = transcript.text.strip()
        pre.reply.allow_synthesis()
        return True

    def _promote_preemptive(
        self, event: UserTurn, audio: Samples, speech_end_t: float, closed_t: float, judged: bool
    ) -> bool:
        """The turn closed: if it is the pause the preemptive reply answers (same speech end,
        same carried audio, nothing recorded since), that reply becomes the turn's and its
        held audio plays now. Otherwise it is dropped; False: answer the turn as usual."""
        pre = self._preemptive
        if pre is None:
            return False
        same = (
            not judged
            and pre.speech_end_sample == event.speech_end_sample
            and audio.size - event.audio.size == pre.carry_samples
            and pre.history_len == len(self.record.history)
            and self._reply is None
            and not pre.reply.cancelled
        )
        if not same:
            self._drop_preemptive("the turn is not the one it answered")
            return False
        if pre.answered_at is None and not pre.draft_asked:
            self._drop_preemptive("its transcript is not in")  # nothing asked: the turn waits
            return False
        if pre.answered_at is None or pre.draft is not None:
            # A draft still to come, or to check: the turn waits for its transcript, and the
            # answer (once asked) may synthesize its first words meanwhile.
            pre.closed = True
            pre.reply.allow_synthesis()
            return False
        self._inherit_acknowledgement(pre.reply)
        self._play_preemptive(pre, speech_end_t, closed_t, audio, stt_ms=0.0)
        return True

    def _adopt_preemptive(self, waiting: Reply, transcript: Transcribed) -> bool:
        """The transcript a confirmed turn waited for is in: if the preemptive reply answered
        its draft and the words agree, that reply takes the turn's place and plays now."""
        pre = self._preemptive
        if pre is None or pre.request != transcript.request:
            return False
        if pre.draft is None:
            self._drop_preemptive("no draft came")
            return False
        if not self._check_draft(pre, transcript):
            return False
        assert waiting.speech_end_t is not None and waiting.closed_t is not None
        assert waiting.user_audio is not None
        self._forget(waiting)  # it never started: nothing of it to record
        if waiting.id in self._acknowledged:
            self._acknowledged[pre.reply.id] = self._acknowledged.pop(waiting.id)
        stt_ms = max(0.0, self._clock.now() - waiting.closed_t) * 1000  # the check's wait
        self._play_preemptive(
            pre, waiting.speech_end_t, waiting.closed_t, waiting.user_audio, stt_ms
        )
        return True

    def _play_preemptive(
        self, pre: _Preemptive, speech_end_t: float, closed_t: float, audio: Samples, stt_ms: float
    ) -> None:
        """The preemptive reply becomes the confirmed turn's: numbered, released, played."""
        self._preemptive = None
        reply = pre.reply
        turn = reply.turn
        assert turn is not None
        turn.started_at = utc_now()  # a turn starts when it closes, as any other
        turn.timings.endpoint_ms = (closed_t - speech_end_t) * 1000
        turn.timings.stt_ms = stt_ms  # 0: transcribed while the user was still silent
        reply.speech_end_t, reply.closed_t, reply.user_audio = speech_end_t, closed_t, audio
        self.record.number(turn)
        self._reply = reply
        self.preemptive_played += 1
        assert pre.answered_at is not None
        self.preemptive_head_start_ms += max(0.0, closed_t - pre.answered_at) * 1000
        reply.confirm()
        self._playout.release(reply.id)
        self._schedule_acknowledgement(reply)  # its first audio may still be on the way
        logger.debug("turn confirmed: the preemptive reply plays")
        self._maybe_done(reply.id)  # it may have been produced with no audio at all

    def _drop_preemptive(self, why: str) -> None:
        """Cancel the preemptive reply: LLM stream closed, TTS stopped, held audio dropped.
        Nothing of it is recorded, captioned or kept in the history."""
        pre = self._preemptive
        if pre is None:
            return
        self._preemptive = None
        reply = pre.reply
        reply.cancel()
        self._playout.clear(reply.id)
        self._forget(reply)
        if pre.answered_at is not None:
            self.wasted_llm_requests += 1
            self.record.llm_request_wasted()
        logger.debug("preemptive reply dropped (%s)", why)

    # ------------------------------------------------------------------ the agent speaks

    def _new_reply(
        self,
        turn: Turn | None,
        *,
        speech_end_t: float | None = None,
        closed_t: float | None = None,
        audio: Samples | None = None,
        held: bool = False,
    ) -> Reply:
        joiner = "" if self._stack.persona.language == "ja" else " "
        reply = Reply(
            next(self._reply_ids),
            turn,
            joiner,
            speech_end_t=speech_end_t,
            closed_t=closed_t,
            user_audio=audio,
            held=held,
        )
        self._replies[reply.id] = reply
        return reply

    def _forget(self, reply: Reply) -> None:
        """Stop tracking a finished reply once its stages can no longer report."""
        if reply.produced or not reply.started:
            self._replies.pop(reply.id, None)
            self._playout.forget(reply.id)

    def _on_chunk_playing(self, event: ChunkPlaying) -> None:
        reply = self._replies.get(event.reply)
        if reply is None or reply.finished:
            return
        if self._first_sound(reply, event):
            return
        if reply.first_audio_at is None:
            reply.first_audio_at = event.at
            if reply.state == "pending":
                reply.state = "speaking"
            if reply.turn is not None and reply.speech_end_t is not None:
                reply.turn.timings.v2v_ms = (event.at - reply.speech_end_t) * 1000
        caption = reply.turn or reply.caption
        if caption is not None:
            # Captions: the chunks that have started playing so far.
            reply.caption_text = reply.joiner.join(reply.texts[: event.index + 1])
            self.record.caption(caption, reply.caption_text)

    def _on_tool(self, event: ToolRunning | ToolDone) -> None:
        """A tool call started or ended: the turn (and the page's transcript) shows it."""
        reply = self._replies.get(event.reply)
        if reply is None or reply.recorded:
            if isinstance(event, ToolDone):
                # The turn was recorded when the caller cut in; this is how the tool ended.
                logger.info(
                    "tool %s ended after its turn was recorded (%s)",
                    event.record.name,
                    event.record.error or "answered",
                )
            return
        if isinstance(event, ToolRunning):
            reply.tool_running = event
        else:
            reply.tool_running = None
            reply.tool_calls.append(event.record)
        if reply.turn is not None:
            reply.turn.tool_calls = reply.tool_calls_so_far()
            self.record.caption(reply.turn, reply.caption_text)

    def _maybe_done(self, reply_id: int) -> None:
        reply = self._replies.get(reply_id)
        if reply is None:
            return
        if reply.finished:
            self._forget(reply)
            return
        if reply is not self._reply or self._paused or not reply.produced:
            return
        if reply.turn is not None and reply.stt_request is not None:
            return
        if self._playout.queued(reply.id) == 0:
            self._finalize(reply, interrupted=False)

    def _on_stage_failed(self, event: StageFailed) -> None:
        reply = self._replies.get(event.reply)
        if reply is None:
            return
        if reply.held:
            # Not confirmed: nobody heard it. The turn, if it comes, is answered afresh.
            if self._preemptive is not None and self._preemptive.reply is reply:
                self._drop_preemptive(f"its {event.stage} stage failed")
            return
        if reply.turn is not None and reply.turn.error is None:
            reply.turn.error = event.error
        self._error_over = self._derive_state()
        self.state = "error"
        detail = event.error
        if event.stage == "llm" and "unreachable" in detail:
            detail += " — start it with `ollama serve`"  # what the page tells the user to do
        self._publish(CallStatus("error", detail))

    def _on_end_requested(self, message: str) -> None:
        """Time limit (or the server): stop and record the reply in flight, say ``message``,
        then close."""
        if self.closing:
            return
        self.closing = True
        self._overlap = None
        self._speculative = None
        self._drop_preemptive("the call is closing")
        self._paused = False
        reply = self._reply
        if reply is not None and not reply.finished:
            reply.cancel()
            self._playout.clear(reply.id)
            self._finalize(reply, interrupted=True)
            self._interrupt()
        self._playout.resume()
        self._closing_message = message or "call ended"
        if message:
            goodbye = self._new_reply(turn=None)
            self._reply = goodbye
            self._stages.say(goodbye, self._stack, [message])
        else:
            self._close()

    def _close(self) -> None:
        message = self._closing_message or "call ended"
        self.end("closed by the agent")
        self._publish(CloseCall(message))

    # ------------------------------------------------------------------ bookkeeping

    def _finalize(self, reply: Reply, *, interrupted: bool) -> None:
        """Record what was actually heard, once per reply."""
        if reply.recorded:
            return
        reply.recorded = True
        if not interrupted:
            reply.state = "done"
        played = self._with_acknowledgement(
            reply, played_text(reply.texts, self._playout.heard(reply.id), reply.joiner)
        )
        if self._reply is reply:
            self._reply = None
            self._paused = False
        self._forget(reply)
        turn = reply.turn
        if turn is None:  # a fixed line: the greeting or the goodbye
            self.record.line_heard(played, reply.caption)
            if self.closing and not self.ended and self._reply is None and not interrupted:
                self._close()
            return
        if not turn.user_text and turn.error is None:
            return
        timings = reply.timings
        turn.timings.llm_ttft_ms = timings.llm_ttft_ms
        turn.timings.llm_first_chunk_ms = timings.llm_first_chunk_ms
        turn.timings.tts_first_ms = timings.tts_first_ms
        turn.assistant_text = played
        turn.interrupted = interrupted
        turn.tool_calls = reply.tool_calls_so_far()
        self.record.turn_done(turn)

    # ------------------------------------------------------------------ the acknowledgement

    def _schedule_acknowledgement(self, reply: Reply) -> None:
        """The answer has started: have the acknowledgement due ``acknowledge_after_ms``
        after the caller's speech ended, giving the answer a head start of its own."""
        persona = self._stack.persona
        if not persona.acknowledgement or reply.speech_end_t is None:
            return
        if reply.id in self._acknowledged:
            return  # the caller heard one for this turn before it merged into this one
        due = max(
            reply.speech_end_t + persona.acknowledge_after_ms / 1000,
            self._clock.now() + ANSWER_HEAD_START_S,
        )
        self._stages.acknowledge(reply, self._stack, due)

    def _inherit_acknowledgement(self, reply: Reply) -> None:
        if self._carry_acknowledged:
            self._acknowledged[reply.id] = ""
        self._carry_acknowledged = False

    def _on_acknowledgement_due(self, event: AcknowledgementDue) -> None:
        """The answer is still silent: say the acknowledgement first, unless the answer's
        audio is already queued, the turn had one, or someone is talking over the agent."""
        reply = self._replies.get(event.reply)
        if (
            reply is None
            or reply is not self._reply
            or reply.finished
            or reply.turn is None
            or reply.first_audio_at is not None
            or reply.id in self._acknowledged
            or self._paused
            or self._overlap is not None
            or self._user_speaking
            or self.closing
        ):
            return
        if self._playout.push_lead_in(reply.id, event.audio):  # False: the answer came first
            self._acknowledged[reply.id] = self._stack.persona.acknowledgement
            logger.debug("answer not ready: acknowledgement first")

    def _first_sound(self, reply: Reply, event: ChunkPlaying) -> bool:
        """Time the turn's first sound of any kind; True for the acknowledgement's own
        report, which is not the answer (v2v counts only the answer)."""
        turn = reply.turn
        if turn is not None and reply.speech_end_t is not None:
            if turn.timings.first_sound_ms is None:
                turn.timings.first_sound_ms = (event.at - reply.speech_end_t) * 1000
        return event.index == LEAD_IN

    def _with_acknowledgement(self, reply: Reply, played: str) -> str:
        """What was heard of the reply, starting with what was heard of its acknowledgement;
        the turn keeps the latter apart for the history (``Turn.acknowledgement``)."""
        text = self._acknowledged.pop(reply.id, "")
        heard = self._playout.lead_in_heard(reply.id)
        if not text or heard is None or reply.turn is None:
            return played
        said = played_text([text], [heard], reply.joiner)
        reply.turn.acknowledgement = said
        return reply.joiner.join(part for part in (said, played) if part)

    def _derive_state(self) -> CallState:
        if self.closing:
            return "closing"
        if self._paused or self._overlap is not None:
            return "paused"
        reply = self._reply
        if reply is not None and not reply.finished:
            return "speaking" if reply.first_audio_at is not None else "thinking"
        return "user_speaking" if self._user_speaking else "listening"

    def _refresh_state(self) -> None:
        reply = self._reply
        self.talking = (
            reply is not None
            and not reply.finished
            and reply.first_audio_at is not None
            and not reply.produced
        )
        state = self._derive_state()
        if self.state == "error":
            if state == self._error_over:
                return  # the error stays until the call moves on
            self._error_over = None
        if state != self.state:
            self.state = state
            self._publish(CallStatus(state))
