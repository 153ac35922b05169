"""``voicebot bench --transport webrtc``: each item over a real WebRTC call, next to ``simulate``.

The served app (``create_app``, the same routes and handler a user runs, under uvicorn on a
loopback port, once per variant of its settings: ``VARIANTS``) answers an aiortc caller
(``voicebot.bench.rtc_client``) that waits for the greeting, says the corpus utterance at
real-time pace and records what it hears. The same item also goes through the in-process
harness (``runner.run_one``), interleaved, so every figure comes from the same minutes of the
same machine.

Speech end is the harness's (our VAD and turn detector on the item's samples, offline); its
time is when the microphone frame holding it was handed to aiortc. Voice-to-voice heard is
speech end to the arrival of the first received frame that is sound, after speech end
(``rtc_client.first_onset``); the harness's figure is given the same way (its first played
frame of the answer that is sound) beside its own.

The pieces, at each boundary (all ``time.monotonic()`` in one process), add up to it:

- input: the microphone frame sent → the server's VAD ran on the window that frame completes
  (``TimedVad``), median over the call; plus Opus's 6.5 ms look-ahead, which delays the
  content, not the packets (the harness: 0);
- pipeline: → the voice's first audio of the reply handed to the call (``TimedSynthesizer``:
  endpointing, STT, LLM, TTS first audio);
- output: → the reply's first frame played by the harness, or its RTP packet at the client
  (our playout, FastRTC's queue and pacing, aiortc's encoder, loopback);
- client buffer: packet arrival → the decoded frame out of the client's track (aiortc's
  jitter buffer holds 4 packets, then the decoder; the harness: 0);
- quiet start: the reply's first frame → its first frame that is sound (the voice's own
  leading silence, and any frame held back on the way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from voicebot.audio import MonoAudio, Samples, resample, to_int16
from voicebot.bench.baseline import SileroV6PauseModel
from voicebot.bench.corpus import CORPUS_RATE, CorpusItem
from voicebot.bench.metrics import Percentiles, percentiles
from voicebot.bench.rtc_client import (
    ONSET_PEAK,
    RATE,
    HeardFrame,
    RtcCaller,
    RtcTrace,
    first_onset,
    until,
)
from voicebot.bench.runner import LanguageSetup, Reference, reference, run_one
from voicebot.simulate import CallTrace
from voicebot.store import InMemoryTurnStore
from voicebot.tts import Synthesizer
from voicebot.vad import VAD_SAMPLE_RATE, VadStream, VoiceActivityModel

logger = logging.getLogger(__name__)

OPUS_LOOKAHEAD_S = 312 / 48000
"""libopus's algorithmic delay: decoded audio lags the encoded by 6.5 ms."""
_WINDOW = 512
_GREETING_S = 30.0
_SETTLE_S = 0.6
_REPLY_WAIT_S = 20.0
_THREADS_WAIT_S = 30.0


class TimedVad:
    """A ``VoiceActivityModel`` that notes when each window of its latest stream was judged."""

    def __init__(self, model: VoiceActivityModel) -> None:
        self._model = model
        self._lock = threading.Lock()
        self.windows: list[float] = []
        """``time.monotonic()`` of each window of the latest stream, in order."""

    def stream(self) -> VadStream:
        times: list[float] = []
        with self._lock:
            self.windows = times
        return _TimedStream(self._model.stream(), times)


class _TimedStream:
    def __init__(self, inner: VadStream, times: list[float]) -> None:
        self._inner = inner
        self._times = times

    def probability(self, window: Samples) -> float:
        self._times.append(time.monotonic())
        return self._inner.probability(window)


class TimedSynthesizer:
    """A ``Synthesizer`` that notes when each ``synthesize`` call yielded its first audio."""

    def __init__(self, inner: Synthesizer) -> None:
        self._inner = inner
        self.name = inner.name
        self.sample_rate = inner.sample_rate
        self.first_audio: list[float] = []
        """``time.monotonic()`` of each call's first piece, as it is handed to the call."""

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        first = True
        for piece in self._inner.synthesize(text):
            if first:
                self.first_audio.append(time.monotonic())
                first = False
            yield piece

    def first_after(self, t: float) -> float | None:
        return next((at for at in self.first_audio if at >= t), None)


def timed(setup: LanguageSetup) -> tuple[LanguageSetup, TimedVad, TimedSynthesizer]:
    """``setup`` with its VAD and its persona's voice timed."""
    runtime = setup.runtime
    stack = runtime.stack(setup.persona)
    voice = TimedSynthesizer(stack.synthesizer)
    vad = TimedVad(runtime.vad)
    stacks = {**runtime.stacks, setup.persona: replace(stack, synthesizer=voice)}
    return replace(setup, runtime=replace(runtime, vad=vad, stacks=stacks)), vad, voice


@dataclass
class Route:
    """One way an item's reply reached the listener (milliseconds).

    The pieces add up to ``heard_ms``: speech end sent → (input) the server's VAD has it →
    (pipeline) first TTS audio → (output) the reply's first frame played by the harness, or
    its packet at the client → (client buffer) the decoded frame out of the client's track →
    (quiet start) the reply's first frame that is sound.
    """

    heard_ms: float | None = None
    """Speech end → first frame of the reply that is sound, as the listener gets it."""
    own_v2v_ms: float | None = None
    """The call's own figure (speech end → first frame out of ``emit``; the harness's: played),
    for the served call as its turn log records it (its speech end is on the decoded audio)."""
    input_ms: float | None = None
    pipeline_ms: float | None = None
    output_ms: float | None = None
    client_buffer_ms: float | None = None
    quiet_start_ms: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class RtcMeasurement:
    """One item through the harness and over WebRTC to each served variant."""

    item: str
    repeat: int
    simulate: Route = field(default_factory=Route)
    webrtc: dict[str, Route] = field(default_factory=dict)


PIECES = (
    ("input_ms", "input: speech end sent → server VAD has it"),
    ("pipeline_ms", "pipeline: → first TTS audio (endpoint, STT, LLM, TTS)"),
    ("output_ms", "output: TTS audio → first frame played / packet at client"),
    ("client_buffer_ms", "client: packet → decoded frame (jitter buffer)"),
    ("quiet_start_ms", "first frame → first sound (the voice's lead-in)"),
)
TOTALS = (
    ("heard_ms", "v2v heard (speech end → first sound)"),
    ("own_v2v_ms", "v2v, the call's own figure (first frame)"),
)
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"rtc_low_latency": False},
    "after": {},
}
"""Served apps the caller alternates between: settings over the defaults. ``before`` puts back
what this bench removed; ``after`` is the app as shipped."""


def sim_first_sound(trace: CallTrace, from_t: float, *, peak: float = ONSET_PEAK) -> float | None:
    """When the harness played the first frame, of audio ``emit`` returned at or after
    ``from_t``, that is sound."""
    number = next((n for at, n in trace.queued if at >= from_t), None)
    if number is None:
        return None
    for (at, frame), n in zip(trace.played, trace.played_numbers, strict=True):
        if n >= number and frame.size and float(np.max(np.abs(frame))) > peak:
            return at
    return None


def input_latency_s(trace: RtcTrace, windows: Sequence[float]) -> float | None:
    """Median of (server VAD judged window j) − (client sent the frame completing it).

    Frames are counted from the first on both sides: loopback loses none, and FastRTC queues
    what arrives before the call starts rather than dropping it."""
    ratio = RATE / VAD_SAMPLE_RATE
    lags: list[float] = []
    for j, judged in enumerate(windows):
        last = int((_WINDOW * (j + 1) - 1) * ratio)
        sent = trace.sent_at(last)
        if sent is None:
            break
        lags.append(judged - sent)
    return statistics.median(lags) if lags else None


@dataclass(frozen=True)
class ServedApp:
    """The app under uvicorn on a loopback port."""

    base_url: str
    store: InMemoryTurnStore
    vad: TimedVad
    voice: TimedSynthesizer


@contextlib.contextmanager
def serve(
    setup: LanguageSetup,
    vad: TimedVad,
    voice: TimedSynthesizer,
    data_dir: Path,
    settings: dict[str, Any] | None = None,
) -> Iterator[ServedApp]:
    """``create_app`` with the bench's (timed) models and no database, on 127.0.0.1."""
    import uvicorn

    from voicebot.server import create_app
    from voicebot.server.service import Backend
    from voicebot.settings import Settings

    store = InMemoryTurnStore()
    runtime = replace(setup.runtime, store=store)

    @contextlib.contextmanager
    def backend(settings: Settings) -> Iterator[Backend]:
        yield Backend(runtime)

    app = create_app(
        Settings(data_dir=data_dir, persona=setup.persona, concurrency_limit=1, **(settings or {})),
        backend=backend,
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None)
    )
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the served app did not start")
        time.sleep(0.05)
    try:
        yield ServedApp(f"http://127.0.0.1:{port}", store, vad, voice)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _speech_48k(item: CorpusItem) -> np.ndarray:
    return to_int16(np.clip(resample(item.audio, CORPUS_RATE, RATE), -1.0, 1.0))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def reply_onset(trace: RtcTrace, speech_end_t: float) -> tuple[HeardFrame, HeardFrame] | None:
    """``(first frame, first sound)`` of the reply: frames whose packets arrived after speech
    end (aiortc's jitter buffer still holds the greeting's last packets and hands them out
    first)."""
    first: HeardFrame | None = None
    for frame in trace.heard:
        arrived = trace.packet_arrival(frame.pts)
        if arrived is None or arrived < speech_end_t:
            continue
        first = first or frame
        if first_onset([frame], 0.0) is not None:
            return first, frame
    return None


async def _rtc_call(served: ServedApp, item: CorpusItem, ref: Reference, m: Route) -> None:
    known = {t.turn_id for t in served.store.turns}
    async with RtcCaller(served.base_url) as caller:
        if not await until(lambda: caller.loud_since(0.0) is not None, _GREETING_S):
            m.notes.append("no greeting")
            return
        await until(lambda: caller.quiet_for(_SETTLE_S), _GREETING_S)
        start = caller.say(_speech_48k(item))
        end_sample = start + int(ref.speech_end * RATE / CORPUS_RATE) - 1
        trace = caller.trace
        speech_s = item.audio.size / CORPUS_RATE
        await until(lambda: trace.sent_at(end_sample) is not None, speech_s + 5)
        speech_end_t = trace.sent_at(end_sample)
        if speech_end_t is None:
            m.notes.append("the microphone stalled")
            return
        if not await until(lambda: reply_onset(trace, speech_end_t) is not None, _REPLY_WAIT_S):
            m.notes.append("no reply heard")
            return
        await asyncio.sleep(0.3)
        windows = list(served.vad.windows)
    onset = reply_onset(trace, speech_end_t)
    assert onset is not None
    first, sound = onset
    m.heard_ms = _ms(sound.at - speech_end_t)
    m.quiet_start_ms = _ms(sound.at - first.at)
    arrived = trace.packet_arrival(first.pts)
    assert arrived is not None
    m.client_buffer_ms = _ms(first.at - arrived)
    tts_t = served.voice.first_after(speech_end_t)
    lag = input_latency_s(trace, windows)
    if tts_t is None or lag is None:
        m.notes.append("no server timings")
    else:
        heard_t = speech_end_t + lag + OPUS_LOOKAHEAD_S
        m.input_ms = _ms(heard_t - speech_end_t)
        m.pipeline_ms = _ms(tts_t - heard_t)
        m.output_ms = _ms(arrived - tts_t)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        turn = next((t for t in served.store.turns if t.turn_id not in known and t.user_text), None)
        if turn is not None:
            v2v = turn.timings.v2v_ms
            m.own_v2v_ms = None if v2v is None else round(v2v, 1)
            break
        await asyncio.sleep(0.05)


def _simulated(
    setup: LanguageSetup,
    voice: TimedSynthesizer,
    pause_model: SileroV6PauseModel,
    item: CorpusItem,
    ref: Reference,
    repeat: int,
) -> Route:
    m = Route(input_ms=0.0, client_buffer_ms=0.0)
    traces: list[CallTrace] = []
    sim = run_one(
        "ours",
        setup,
        pause_model,
        item,
        ref,
        repeat=repeat,
        interrupt=False,
        on_trace=traces.append,
    )
    m.own_v2v_ms = sim.v2v_ms
    trace = traces[0]
    speech_end_t = trace.wall_time(ref.speech_end - 1)
    tts_t = voice.first_after(speech_end_t)
    first = trace.first_played_from(tts_t) if tts_t is not None else None
    sound = sim_first_sound(trace, tts_t) if tts_t is not None else None
    if tts_t is None or first is None or sound is None:
        m.notes.append("no reply audio")
        return m
    m.heard_ms = _ms(sound - speech_end_t)
    m.pipeline_ms = _ms(tts_t - speech_end_t)
    m.output_ms = _ms(first - tts_t)
    m.quiet_start_ms = _ms(sound - first)
    return m


def run_webrtc(
    setup: LanguageSetup,
    items: Sequence[CorpusItem],
    *,
    repeats: int,
    variants: dict[str, dict[str, Any]] | None = None,
    simulate: bool = True,
    progress: Callable[[RtcMeasurement], None] | None = None,
) -> list[RtcMeasurement]:
    """Each item through the harness (unless not ``simulate``), then over WebRTC to each
    variant of the served app (``VARIANTS`` by default), interleaved, ``repeats`` times over."""
    variants = VARIANTS if variants is None else variants
    pause_model = SileroV6PauseModel(setup.runtime.vad)
    refs = {i.name: reference(setup.runtime.vad, setup.runtime.turn_config, i) for i in items}
    timed_setup, vad, voice = timed(setup)
    results: list[RtcMeasurement] = []
    before = {t.ident for t in threading.enumerate()}
    with contextlib.ExitStack() as stack:
        stack.callback(_join_new_threads, before, _THREADS_WAIT_S)
        served: dict[str, ServedApp] = {}
        for name, overrides in variants.items():
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="voicebot-rtc-"))
            served[name] = stack.enter_context(
                serve(timed_setup, vad, voice, Path(data_dir), overrides)
            )
        for repeat in range(repeats):
            for item in items:
                ref = refs[item.name]
                m = RtcMeasurement(item.name, repeat)
                if simulate:
                    m.simulate = _simulated(timed_setup, voice, pause_model, item, ref, repeat)
                for name, app in served.items():
                    path = m.webrtc[name] = Route()
                    try:
                        asyncio.run(_rtc_call(app, item, ref, path))
                    except (ConnectionError, OSError) as e:
                        path.notes.append(f"call failed: {e}")
                results.append(m)
                if progress is not None:
                    progress(m)
    return results


def _join_new_threads(before: set[int | None], timeout_s: float) -> None:
    """Let the calls' threads end (a reply still being synthesized when the caller hung up):
    a process that exits under them can abort in a native library's destructor."""
    deadline = time.monotonic() + timeout_s
    current = threading.current_thread()
    left: list[threading.Thread] = []
    while time.monotonic() < deadline:
        left = [
            t
            for t in threading.enumerate()
            if t.ident not in before and t is not current and t.is_alive() and not _pooled(t)
        ]
        if not left:
            return
        left[0].join(min(1.0, max(0.0, deadline - time.monotonic())))
    names = ", ".join(sorted({t.name for t in left}))
    logger.warning("threads still running %.0f s after the run: %s", timeout_s, names)


def _pooled(thread: threading.Thread) -> bool:
    # Idle executor workers (asyncio's, anyio's) wait for work forever; they hold no call.
    return thread.name.startswith(("ThreadPoolExecutor", "AnyIO worker", "asyncio_"))


@dataclass
class RtcSummary:
    """Percentiles of every figure, per path (``simulate``, ``webrtc <variant>``)."""

    figures: dict[str, dict[str, Percentiles]]
    calls: int


def summarize_webrtc(measurements: Sequence[RtcMeasurement]) -> RtcSummary:
    paths: dict[str, list[Route]] = {"simulate": [m.simulate for m in measurements]}
    for m in measurements:
        for name, path in m.webrtc.items():
            paths.setdefault(f"webrtc {name}", []).append(path)
    figures = {
        label: {
            name: percentiles([getattr(p, name) for p in runs]) for name, _ in (*TOTALS, *PIECES)
        }
        for label, runs in paths.items()
    }
    return RtcSummary(figures, len(measurements))


def format_webrtc(summary: RtcSummary) -> str:
    """One column per path: p50 of each total and piece, then the totals' p95."""
    labels = list(summary.figures)
    width = max(12, *(len(label) + 1 for label in labels))
    lines = [f"{summary.calls} items, each through every path in turn", ""]
    lines.append(f"  {'p50 (ms)':<56}" + "".join(f"{label:>{width}}" for label in labels))
    for name, label in (*TOTALS, *PIECES):
        cells = [_fmt(summary.figures[path][name].p50) for path in labels]
        lines.append(f"  {label:<56}" + "".join(f"{cell:>{width}}" for cell in cells))
    for name, label in TOTALS:
        cells = [_fmt(summary.figures[path][name].p95) for path in labels]
        lines.append(f"  {label + ', p95':<56}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


@dataclass
class WebRtcReport:
    """``voicebot bench --transport webrtc``: per-item figures and their summary, per language."""

    machine: dict[str, Any]
    config: dict[str, Any]
    summaries: dict[str, RtcSummary]
    measurements: dict[str, list[RtcMeasurement]]

    def to_json(self) -> str:
        import json
        from dataclasses import asdict

        return json.dumps(asdict(self), ensure_ascii=False, indent=2)

    def table(self) -> str:
        parts = [f"[{language}] {format_webrtc(s)}" for language, s in self.summaries.items()]
        load = self.machine.get("load_average")
        if load:
            parts.append(f"load average before/after: {load}")
        return "\n\n".join(parts)
