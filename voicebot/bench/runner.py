"""Run both pipelines on the same inputs, interleaved, and measure them from outside.

Every call goes through ``voicebot.simulate.drive`` (20 ms input frames at real-time pace,
output played at playback pace). Definitions, identical for both pipelines:

- speech end: the end of the last voiced 32 ms window of the utterance per our Silero VAD
  and turn detector, run offline on the same samples; its wall time is when the input frame
  holding it was handed to the handler;
- v2v: speech end to the first reply frame the player sends; with the persona's
  acknowledgement, the first frame of the answer after it (the player's time of the first
  sound plus how much later the call itself saw the answer start);
- first sound: speech end to the first agent frame the player sends, acknowledgement
  included (= v2v without one);
- endpoint: speech end to the turn being closed (ours: the handler's own measurement, whose
  speech end is the same detector on the same samples; baseline: when ``ReplyOnPause``
  calls the reply function);
- barge-in stop: start of the interrupting speech (first voiced window) to the last frame of
  the agent's reply the player sends;
- STT / LLM / TTS: measured inside each pipeline (baseline: inside its reply function, where
  "LLM first token" is the whole reply, since the cookbook waits for it).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from voicebot.bench.baseline import BaselineTurn, SileroV6PauseModel, cookbook_call
from voicebot.bench.corpus import CORPUS_RATE, CorpusItem
from voicebot.bench.metrics import error_count
from voicebot.conversation import TIMING_FIELDS, Turn
from voicebot.handler import VoiceHandler
from voicebot.runtime import PersonaStack, Runtime
from voicebot.simulate import FRAME_S, CallTrace, DrivenHandler, Interruption, drive
from voicebot.turns import SpeechStarted, TurnConfig, TurnDetector, UserTurn
from voicebot.vad import VoiceActivityModel

logger = logging.getLogger(__name__)

Pipeline = Literal["ours", "baseline"]
PIPELINES: tuple[Pipeline, ...] = ("ours", "baseline")
METRICS = (*TIMING_FIELDS, "reply_stall_ms")
_STALL_MIN_S = 0.06
"""A pause between two played frames longer than this (three frames) is the reply's audio
running out, not the player's scheduling."""
_SETTLE_S = 0.5


PREEMPTIVE_SETTINGS: Mapping[str, tuple[bool, bool]] = {
    "on": (True, True),
    "nodraft": (True, False),
    "off": (False, False),
}
"""``--preemptive`` words: (preemptive replies, started on the STT draft)."""


def preemptive_setting(config: TurnConfig) -> str:
    """The ``PREEMPTIVE_SETTINGS`` name of a turn configuration."""
    if not config.preemptive_replies:
        return "off"
    return "on" if config.stt_drafts else "nodraft"


@dataclass(frozen=True)
class LanguageSetup:
    """The models for one language, shared by both pipelines."""

    language: str
    runtime: Runtime
    persona: str

    @property
    def stack(self) -> PersonaStack:
        """The persona's STT, LLM and TTS."""
        return self.runtime.stack(self.persona)


@dataclass(frozen=True)
class Reference:
    """Where the speech is in an item, per our VAD (16 kHz samples)."""

    speech_end: int
    interruption_start: int | None = None
    """First voiced sample of the interruption, from the interruption's own start."""


@dataclass
class Measurement:
    """One pipeline on one corpus item (milliseconds)."""

    pipeline: Pipeline
    item: str
    language: str
    repeat: int
    sessions: int = 1
    endpoint_ms: float | None = None
    stt_ms: float | None = None
    llm_ttft_ms: float | None = None
    llm_first_chunk_ms: float | None = None
    tts_first_ms: float | None = None
    v2v_ms: float | None = None
    first_sound_ms: float | None = None
    bargein_stop_ms: float | None = None
    reply_stall_ms: float | None = None
    """How long the answer's audio ran out after it had started (TTS or the LLM behind the
    playback), up to the interruption: the sum of the pauses between played frames."""
    reference: str = ""
    transcript: str = ""
    reply: str = ""
    errors: int = 0
    reference_tokens: int = 0
    feed_lag_ms: float = 0.0
    """Worst lateness of an input frame: above a frame or two the machine is saturated."""
    preemptive: str | None = None
    """Ours: its ``PREEMPTIVE_SETTINGS`` name (None: the baseline)."""
    variant: str = ""
    """Ours run with a setting other than the main one ("preemptive off"): reported apart."""
    turns: int = 0
    """Turns the call answered."""
    wasted_llm_requests: int = 0
    """Preemptive replies dropped after their LLM request was sent."""
    preemptive_played: int = 0
    """Turns answered by their preemptive reply (its transcript was in when the turn ended)."""
    preemptive_head_start_ms: float | None = None
    """Mean over those turns: how long their LLM had been asked when the turn closed."""
    notes: list[str] = field(default_factory=list)

    def value(self, metric: str) -> float | None:
        """The metric by name."""
        value = getattr(self, metric)
        return None if value is None else float(value)


def reference(vad: VoiceActivityModel, config: TurnConfig, item: CorpusItem) -> Reference:
    """Speech end of the utterance and speech start of its interruption, per our VAD."""

    def bounds(samples: np.ndarray) -> tuple[int | None, int | None]:
        detector = TurnDetector(config, vad.stream())
        padded = np.concatenate([samples, np.zeros(CORPUS_RATE, np.float32)])
        events = detector.push(padded)
        starts = [e.start_sample for e in events if isinstance(e, SpeechStarted)]
        ends = [e.speech_end_sample for e in events if isinstance(e, UserTurn)]
        return (starts[0] if starts else None), (ends[-1] if ends else None)

    _, end = bounds(item.audio)
    if end is None:
        raise ValueError(f"corpus item {item.name}: our VAD finds no speech in it")
    start = bounds(item.barge_in)[0] if item.barge_in is not None else None
    return Reference(end, start)


def _stop_rule(
    with_interruption: bool, reply_from: Callable[[], float | None]
) -> Callable[[CallTrace, float], bool]:
    def stop(trace: CallTrace, tail_s: float) -> bool:
        now = time.monotonic()
        if with_interruption:
            # ReplyOnPause reacts only after the interruption ended and a pause of up to
            # 1.2 s was seen; a slow TTS may leave gaps in the reply meanwhile.
            return (
                tail_s >= _BASELINE_SETTLE_S + 0.5
                and bool(trace.played)
                and now - trace.played[-1][0] >= _SETTLE_S
            )
        # Every figure is known once the reply's first audio is out: no need to hear it all.
        start = reply_from()
        first = trace.first_played_from(start) if start is not None else None
        return first is not None and now - first >= _SETTLE_S

    return stop


def _feed_lag_ms(trace: CallTrace) -> float:
    lags = [at - (trace.t0 + i * FRAME_S) for i, at in enumerate(trace.input_times)]
    return round(max(lags, default=0.0) * 1000, 1)


def run_one(
    pipeline: Pipeline,
    setup: LanguageSetup,
    pause_model: SileroV6PauseModel,
    item: CorpusItem,
    ref: Reference,
    *,
    repeat: int = 0,
    sessions: int = 1,
    interrupt: bool = True,
    interrupt_after_s: float = 1.0,
    max_tail_s: float = 15.0,
    preemptive: str | None = None,
    variant: str = "",
    on_trace: Callable[[CallTrace], None] | None = None,
) -> Measurement:
    """Drive one simulated call through ``pipeline`` and measure it; ``preemptive``: ours
    with one of ``PREEMPTIVE_SETTINGS`` (None: as the runtime is set); ``on_trace`` gets the
    call's trace once it is over."""
    interruption = None
    if interrupt and item.barge_in is not None:
        interruption = Interruption(item.barge_in, interrupt_after_s)
    ours: VoiceHandler | None = None
    wall_offset = time.time() - time.monotonic()
    baseline_turns: list[BaselineTurn] = []
    traced: list[CallTrace] = []
    acknowledges = pipeline == "ours" and bool(setup.stack.persona.acknowledgement)
    answer_seen: list[float] = []

    def live_speech_end() -> float | None:
        # Known once the frame holding the speech end was sent.
        trace = traced[0] if traced else None
        if trace is None or len(trace.input_times) * trace.frame_samples < ref.speech_end:
            return None
        return trace.wall_time(ref.speech_end - 1)

    def reply_from() -> float | None:
        """When audio of the reply to the whole utterance started to come out of ``emit``."""
        end = live_speech_end()
        if end is None or ours is None:
            pass
        elif not acknowledges:
            return end
        else:
            # The first audio may be the acknowledgement: the reply is the answer, whose
            # audio starts when the call says it speaks.
            if not answer_seen and ours.call.state == "speaking":
                answer_seen.append(time.monotonic())
            if not answer_seen:
                return None
            first = traced[0].first_played_from(end) if traced else None
            return answer_seen[0] if first is not None and first < answer_seen[0] - 0.1 else end
        if end is None or ours is not None:
            return end
        # ReplyOnPause may have answered part of the utterance (a mid-utterance pause), and
        # its VAD may end the utterance before ours does: its last turn is the answer, once
        # no pause can be detected any more (it needs at most 1.2 s of silence).
        trace = traced[0]
        input_end = trace.wall_time(trace.input_end_sample - 1)
        if not baseline_turns or time.monotonic() - input_end < _BASELINE_SETTLE_S:
            return None
        return baseline_turns[-1].first_yield_t

    if interruption is not None:
        interruption.reply_from = reply_from
    handler: DrivenHandler
    call = None
    if pipeline == "ours":
        runtime = setup.runtime
        if preemptive is not None:
            replies, drafts = PREEMPTIVE_SETTINGS[preemptive]
            config = dataclasses.replace(
                runtime.turn_config, preemptive_replies=replies, stt_drafts=drafts
            )
            runtime = dataclasses.replace(runtime, turn_config=config)
        handler = ours = VoiceHandler(
            runtime, channel="simulate", persona=setup.persona, greet=False
        )
    else:
        call = cookbook_call(setup.stack, pause_model)
        handler, baseline_turns = call.handler, call.turns
    try:
        trace = drive(
            handler,
            (CORPUS_RATE, item.audio),
            interruption=interruption,
            stop_when=_stop_rule(interruption is not None, reply_from),
            max_tail_s=max_tail_s,
            as_int16=True,
            on_start=traced.append,
        )
    finally:
        if call is not None:
            call.close()
    if on_trace is not None:
        on_trace(trace)
    m = Measurement(pipeline, item.name, item.language, repeat, sessions, reference=item.text)
    m.feed_lag_ms = _feed_lag_ms(trace)
    if ours is not None:
        m.preemptive = preemptive_setting(ours.call.runtime.turn_config)
        m.variant = variant
        m.wasted_llm_requests = ours.call.wasted_llm_requests
        m.preemptive_played = ours.call.preemptive_played
        if m.preemptive_played:
            head_start = ours.call.preemptive_head_start_ms / m.preemptive_played
            m.preemptive_head_start_ms = round(head_start, 1)
        m.turns = sum(1 for t in ours.completed_turns if t.user_text)
    speech_end_t = trace.wall_time(ref.speech_end - 1)
    cutoff = math.inf
    if trace.interruption_start_sample is not None:
        cutoff = trace.wall_time(trace.interruption_start_sample)
    answers = (
        _our_answers(ours.completed_turns, wall_offset)
        if ours is not None
        else _baseline_answers(baseline_turns, speech_end_t)
    )
    all_answers = answers
    answers = sorted((a for a in answers if a.closed_t < cutoff), key=lambda a: a.closed_t)
    # The answer to the utterance is the last turn taken before any interruption; earlier
    # ones answered part of it (the pipeline took a mid-utterance pause for the end).
    final = answers[-1] if answers else None
    if final is None:
        m.notes.append("no turn")
    else:
        early = answers[:-1]
        if early:
            m.notes.append(f"replied {len(early)}x before the user finished")
        if final.closed_t < speech_end_t:
            m.notes.append("closed the turn before the speech ended")
        final.fill(m)
        m.transcript = " ".join(a.user_text for a in [*early, final] if a.user_text)
        first_audio = trace.first_played_from(max(final.audio_from_t, speech_end_t))
        heard_at(m, first_audio, speech_end_t)
        m.reply_stall_ms = reply_stall_ms(trace, first_audio, cutoff)
        if interruption is not None:
            later = [a.audio_from_t for a in all_answers if a.closed_t >= cutoff]
            end_t = (
                trace.wall_time(trace.interruption_end_sample)
                if ours is not None and trace.interruption_end_sample is not None
                else None
            )
            measure_barge_in(m, trace, ref, final, interrupted_reply_end(later, end_t))
    count = error_count(item.text, m.transcript, item.language)
    m.errors, m.reference_tokens = count.errors, count.length
    return m


_BASELINE_SETTLE_S = 1.0


def reply_stall_ms(trace: CallTrace, first_audio: float | None, until: float) -> float | None:
    """The silence the player had to add inside the answer: from its first frame to ``until``
    (the interruption) or the end of the call, every pause between two played frames beyond
    their 20 ms, counted where it is longer than ``_STALL_MIN_S``."""
    if first_audio is None:
        return None
    times = [at for at, _ in trace.played if first_audio <= at < until]
    stall = sum(
        later - earlier - FRAME_S
        for earlier, later in itertools.pairwise(times)
        if later - earlier > _STALL_MIN_S
    )
    return round(stall * 1000, 1)


@dataclass
class Answer:
    """A turn a pipeline took, with when it was closed (monotonic seconds)."""

    closed_t: float
    user_text: str
    interrupted: bool
    fill: Callable[[Measurement], None]
    audio_from_t: float
    """Audio ``emit`` returned from this time on belongs to this turn's reply."""


def _our_answers(turns: Sequence[Turn], wall_offset: float) -> list[Answer]:
    answers: list[Answer] = []
    for turn in turns:
        if not turn.user_text:
            continue

        def fill(m: Measurement, turn: Turn = turn) -> None:
            t = turn.timings
            m.endpoint_ms, m.stt_ms = t.endpoint_ms, t.stt_ms
            m.llm_ttft_ms, m.llm_first_chunk_ms = t.llm_ttft_ms, t.llm_first_chunk_ms
            m.tts_first_ms, m.reply = t.tts_first_ms, turn.assistant_text
            # the call's own view; run_one puts both on the player's clock
            m.first_sound_ms, m.v2v_ms = t.first_sound_ms, t.v2v_ms

        # A turn is created when it is closed; its started_at is wall-clock time.
        closed = turn.started_at.timestamp() - wall_offset
        # Ours drops what is queued of an earlier reply when the user talks over it.
        answers.append(Answer(closed, turn.user_text, turn.interrupted, fill, closed))
    return sorted(answers, key=lambda a: a.closed_t)


def heard_at(m: Measurement, first_audio: float | None, speech_end_t: float) -> None:
    """Put first sound and v2v on the player's clock: first sound is when the player sent the
    first frame after the speech end; the answer (v2v) came as much later as the call itself
    saw it come after its acknowledgement (``m`` holds the call's own figures, if any)."""
    lag = None
    if m.first_sound_ms is None or m.v2v_ms is not None:
        lag = (m.v2v_ms or 0.0) - (m.first_sound_ms or 0.0)
    if first_audio is None:
        m.notes.append("no reply audio")
        m.first_sound_ms = m.v2v_ms = None
        return
    m.first_sound_ms = round((first_audio - speech_end_t) * 1000, 1)
    m.v2v_ms = None if lag is None else round(m.first_sound_ms + lag, 1)
    if lag is None:
        m.notes.append("acknowledged, but the answer was not heard")


def _baseline_answers(records: Sequence[BaselineTurn], speech_end_t: float) -> list[Answer]:
    answers: list[Answer] = []
    for i, record in enumerate(records):

        def fill(m: Measurement, record: BaselineTurn = record) -> None:
            m.endpoint_ms = round((record.called_t - speech_end_t) * 1000, 1)
            m.stt_ms, m.tts_first_ms = record.stt_ms, record.tts_first_ms
            m.llm_ttft_ms = m.llm_first_chunk_ms = record.llm_ms
            m.reply = record.reply_text
            if record.error:
                m.notes.append(f"reply failed: {record.error}")

        # Superseded by a later turn means ReplyOnPause dropped it: it was interrupted.
        interrupted = record.interrupted or i + 1 < len(records)
        # ReplyOnPause may still hand out a sentence of a dropped reply after calling the
        # next one (it cannot close a generator that is running): skip past it.
        audio_from = record.first_yield_t if record.first_yield_t is not None else math.inf
        answers.append(Answer(record.called_t, record.user_text, interrupted, fill, audio_from))
    return answers


def interrupted_reply_end(
    later_answers: Sequence[float], interruption_end_t: float | None
) -> float:
    """Until when the interrupted reply's frames count as its own: until the answer to the
    interruption starts (``later_answers``: when each later answer's audio began). For ours
    (``interruption_end_t`` given), at most until 250 ms after the interruption ends: ours
    answers once the interruption's turn closes, and an answer prepared from the draft plays
    at the close, which a turn-end model brings to 160 ms."""
    if interruption_end_t is None:
        return min(later_answers, default=math.inf)
    return min([*later_answers, interruption_end_t + 0.25])


def measure_barge_in(
    m: Measurement,
    trace: CallTrace,
    ref: Reference,
    reply: Answer,
    next_audio_t: float,
) -> None:
    """Interrupting speech start to the last played frame of ``reply``.

    The reply's frames are those ``emit`` returned from its start until ``next_audio_t``
    (when the answer to the interruption started), whatever gaps they have.
    """
    if trace.interruption_start_sample is None or ref.interruption_start is None:
        m.notes.append("interruption not played")
        return
    start_t = trace.wall_time(trace.interruption_start_sample + ref.interruption_start)
    first = next((n for at, n in trace.queued if at >= reply.audio_from_t), None)
    after = next((n for at, n in trace.queued if at >= next_audio_t), None)
    played = [
        at
        for (at, _), n in zip(trace.played, trace.played_numbers, strict=True)
        if first is not None and n >= first and (after is None or n < after)
    ]
    if not played or played[-1] < start_t:
        m.notes.append("reply ended before the interruption started")
    elif not reply.interrupted:
        m.notes.append("reply ended during the interruption")
    else:
        m.bargein_stop_ms = round((played[-1] - start_t) * 1000, 1)


def run_interleaved(
    setups: dict[str, LanguageSetup],
    items: Sequence[CorpusItem],
    *,
    repeats: int,
    interrupt_after_s: float = 1.0,
    progress: Callable[[Measurement], None] | None = None,
    preemptive: Sequence[str] = (),
) -> list[Measurement]:
    """Each item through ours then the baseline (A B A B ...), ``repeats`` times over.

    ``preemptive``: ours with each of these ``PREEMPTIVE_SETTINGS`` in turn for every item;
    the first is the main run (compared with the baseline), the others are reported apart
    (empty: as the runtime is set)."""
    variants: list[tuple[str | None, str]] = [
        (p, "" if i == 0 else f"preemptive {p}") for i, p in enumerate(preemptive)
    ] or [(None, "")]
    pause_models = {lang: SileroV6PauseModel(s.runtime.vad) for lang, s in setups.items()}
    for model in pause_models.values():
        model.warmup()
    refs = {
        item.name: reference(
            setups[item.language].runtime.vad, setups[item.language].runtime.turn_config, item
        )
        for item in items
    }
    results: list[Measurement] = []
    for repeat in range(repeats):
        for index, item in enumerate(items):
            setup = setups[item.language]
            # Every other item the other way round, so that no variant always runs right
            # after the baseline (whose reply threads may still be finishing).
            ordered = variants if index % 2 == 0 else variants[::-1]
            for pipeline in PIPELINES:
                for setting, variant in ordered if pipeline == "ours" else [(None, "")]:
                    m = run_one(
                        pipeline,
                        setup,
                        pause_models[item.language],
                        item,
                        refs[item.name],
                        repeat=repeat,
                        interrupt_after_s=interrupt_after_s,
                        preemptive=setting,
                        variant=variant,
                    )
                    results.append(m)
                    if progress is not None:
                        progress(m)
    return results


def session_levels(max_sessions: int) -> list[int]:
    """1, 2, 4, ... up to ``max_sessions`` (always included)."""
    levels = [1]
    while levels[-1] * 2 < max_sessions:
        levels.append(levels[-1] * 2)
    if max_sessions > 1:
        levels.append(max_sessions)
    return levels


def run_sessions(
    setup: LanguageSetup,
    items: Sequence[CorpusItem],
    *,
    max_sessions: int,
    pipelines: Sequence[Pipeline] = ("ours",),
    calls_per_level: int = 6,
    progress: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """N simultaneous calls (N = 1, 2, 4 … max), each on a different item, no interruption."""
    pause_model = SileroV6PauseModel(setup.runtime.vad)
    refs = {
        item.name: reference(setup.runtime.vad, setup.runtime.turn_config, item) for item in items
    }
    results: list[Measurement] = []
    lock = threading.Lock()
    for pipeline in pipelines:
        for level in session_levels(max_sessions):
            rounds = max(1, math.ceil(calls_per_level / level))
            for round_ in range(rounds):
                batch = [items[(round_ * level + k) % len(items)] for k in range(level)]

                def call(
                    item: CorpusItem,
                    pipeline: Pipeline = pipeline,
                    level: int = level,
                    round_: int = round_,
                ) -> None:
                    m = run_one(
                        pipeline,
                        setup,
                        pause_model,
                        item,
                        refs[item.name],
                        repeat=round_,
                        sessions=level,
                        interrupt=False,
                    )
                    with lock:
                        results.append(m)
                    if progress is not None:
                        progress(m)

                threads = [
                    threading.Thread(target=call, args=(item,), name=f"session-{k}", daemon=True)
                    for k, item in enumerate(batch)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
    return results
