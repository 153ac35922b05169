"""voicebot bench on a tiny corpus with real models: shape and sanity, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastrtc import SileroVadOptions
from fastrtc.pause_detection.silero import SileroVADModel

from tests.support_voice import say_exactly
from voicebot.bench.baseline import SileroV6PauseModel, speech_timestamps
from voicebot.bench.corpus import (
    INTERRUPT_EN,
    Speak,
    UtteranceSpec,
    generate_corpus,
    load_corpus,
)
from voicebot.bench.main import BenchOptions, run_bench
from voicebot.bench.metrics import error_count, percentiles
from voicebot.bench.report import format_table, plot
from voicebot.bench.rtc_client import FRAME, HeardFrame, RtcTrace, first_onset, frame_onset_s
from voicebot.bench.runner import (
    Answer,
    Measurement,
    Reference,
    interrupted_reply_end,
    measure_barge_in,
    reply_stall_ms,
)
from voicebot.bench.webrtc import input_latency_s, reply_onset
from voicebot.settings import Settings
from voicebot.simulate import CallTrace
from voicebot.vad import SileroVad


def test_error_rates_normalise_case_punctuation_and_japanese_spacing() -> None:
    assert error_count("Hello, there!", "hello there", "en").rate == 0
    count = error_count("What time is it?", "what time it is", "en")
    assert (count.errors, count.length) == (2, 4)
    assert error_count("予約をお願いします。", "予約を お願いします", "ja").rate == 0
    assert error_count("こんにちは。", "こんにちわ", "ja").errors == 1
    assert percentiles([None, 1.0, 3.0]).p50 == 2.0
    assert percentiles([None]).n == 0


class _ScriptedV4(SileroVADModel):
    """FastRTC's own timestamp logic over scripted probabilities (no model, no download)."""

    def __init__(self, probabilities: list[float]) -> None:
        self._probabilities = iter(probabilities)

    def __call__(self, x, state, sr):
        return next(self._probabilities), state


@pytest.mark.parametrize("seed", range(5))
def test_pause_model_timestamps_match_fastrtc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    options = SileroVadOptions(min_silence_duration_ms=300, speech_pad_ms=100)
    n = 80
    # Runs of speech and silence, like a VAD's output.
    runs = np.repeat(rng.random(n // 8) > 0.5, 8).astype(float) * 0.9
    probabilities = [float(p) for p in np.clip(runs + rng.normal(0, 0.05, n), 0, 1)]
    audio = np.zeros(n * options.window_size_samples, np.float32)
    theirs = _ScriptedV4(probabilities).get_speech_timestamps(audio, options)
    assert speech_timestamps(probabilities, audio.size, options) == theirs


def _speaker(voice: Path) -> Speak:
    return lambda text: say_exactly(voice, text)


def test_pause_model_hears_real_speech(joe_voice_path: Path, silero_model_path: Path) -> None:
    speak = _speaker(joe_voice_path)
    rate, speech = speak("Good morning, how are you?")
    model = SileroV6PauseModel(SileroVad(silero_model_path))
    model.warmup()
    seconds, chunks = model.vad((rate, speech), None)
    assert 0.5 < seconds <= len(speech) / rate + 0.01 and chunks
    silent, none = model.vad((16000, np.zeros(9600, np.float32)), None)
    assert silent == 0 and none == []


def test_bench_tiny_corpus_end_to_end(
    tmp_path: Path, tiny_en_model_dir: Path, joe_voice_path: Path
) -> None:
    speak = _speaker(joe_voice_path)
    corpus = tmp_path / "corpus"
    specs = (
        UtteranceSpec("short", "Hello there.", "en", lead_s=0.3, tail_s=0.3),
        UtteranceSpec(
            "long",
            "Tell me about the history of the old city, please.",
            "en",
            lead_s=0.3,
            tail_s=0.3,
            barge_in=INTERRUPT_EN.name,
        ),
    )
    generate_corpus(corpus, {"en": speak}, specs)
    items = load_corpus(corpus)
    assert [i.name for i in items] == ["short", "long"]
    assert items[1].barge_in is not None and items[0].barge_in is None

    options = BenchOptions(
        corpus=corpus,
        languages=("en",),
        repeats=1,
        llm_profile="instant",
        sessions=2,
        calls_per_level=1,
        stt_model=str(tiny_en_model_dir),
        tts_voice=str(joe_voice_path),
    )
    report = run_bench(options, Settings(data_dir=tmp_path / "data"))

    assert len(report.measurements) == 4  # 2 items x 2 pipelines, interleaved
    assert [m.pipeline for m in report.measurements] == ["ours", "baseline"] * 2
    for m in report.measurements:
        assert m.v2v_ms is not None and m.v2v_ms > 0, m
        assert m.first_sound_ms == m.v2v_ms, m  # no acknowledgement in assistant-en
        assert m.endpoint_ms is not None and m.stt_ms is not None, m
        assert m.llm_ttft_ms is not None and m.tts_first_ms is not None, m
        assert m.transcript, m
        assert m.reference_tokens > 0
    long_runs = [m for m in report.measurements if m.item == "long"]
    assert all(m.bargein_stop_ms is not None for m in long_runs), long_runs
    ours, base = report.summary("ours", "en"), report.summary("baseline", "en")
    assert ours is not None and base is not None
    assert ours.error_rate is not None and ours.error_rate < 0.5
    assert base.metrics["v2v_ms"].p50 is not None
    v2v = next(r for r in report.ratios if r.metric == "v2v_ms")
    assert v2v.p50_ratio is not None and v2v.per_repeat_min == v2v.per_repeat_max
    assert [s.sessions for s in report.sessions] == [1, 2]
    assert all(s.v2v.n >= 1 for s in report.sessions)
    assert {t.name for t in report.targets} >= {"v2v p50 ours/baseline"}

    data = json.loads(report.to_json())
    assert data["summaries"][0]["metrics"]["v2v_ms"]["p50"] is not None
    assert len(data["measurements"]) == 4
    table = format_table(report)
    assert "voice-to-voice" in table and "barge-in stop" in table and "first sound" in table
    png = tmp_path / "bench.png"
    plot(report, png)
    assert png.stat().st_size > 10_000


# --- the WebRTC mode's measurement logic (synthetic frames, no call) --------------------------


def _heard(at: float, pts: int, peak: float) -> HeardFrame:
    samples = np.zeros(FRAME, np.float32)
    samples[FRAME // 2] = peak
    return HeardFrame(at, pts, samples)


def test_received_audio_onset_skips_silence_and_the_greetings_tail() -> None:
    # Packets every 20 ms from t=0; aiortc's jitter buffer hands frames out 80 ms after their
    # packet. The greeting's last frames (loud ones included) were in before speech end (t=1.0)
    # but come out of the buffer after it; the reply's first frames are silence.
    trace = RtcTrace(packets=[(0.02 * i, 5000 + FRAME * i) for i in range(100)])
    peaks = {48: 0.3, 49: 0.001, 50: 0.0, 51: 0.0, 52: 0.005, 53: 0.2, 54: 0.5}
    trace.heard = [_heard(0.02 * i + 0.08, FRAME * i, peaks.get(i, 0.0)) for i in range(48, 60)]

    assert first_onset(trace.heard, 0.0) is trace.heard[0]  # the greeting's loud tail
    onset = reply_onset(trace, speech_end_t=1.0)
    assert onset is not None
    first, sound = onset
    assert (first.pts, sound.pts) == (50 * FRAME, 53 * FRAME)
    assert trace.packet_arrival(sound.pts) == pytest.approx(1.06)
    assert frame_onset_s(sound.samples) == pytest.approx(0.01)
    assert reply_onset(trace, speech_end_t=5.0) is None  # nothing after it


def test_input_latency_is_the_median_lag_from_sent_frame_to_judged_window() -> None:
    trace = RtcTrace(sent=[0.02 * i for i in range(200)])  # 48 kHz frames of 960 samples
    # window j (512 samples at 16 kHz) ends in the frame holding 48 kHz sample 1536 (j+1) - 3
    ends = [((512 * (j + 1) - 1) * 3) // FRAME for j in range(100)]
    windows = [0.02 * end + 0.045 for end in ends]
    windows[10] += 0.5  # a stall: the median ignores it
    assert input_latency_s(trace, windows) == pytest.approx(0.045)
    assert input_latency_s(RtcTrace(), windows) is None


@pytest.mark.parametrize(
    ("from_rate", "to_rate"),
    [(24000, 48000), (22050, 16000), (8000, 16000), (48000, 16000), (24000, 8000), (16000, 16000)],
)
def test_the_stream_resampler_has_no_seams_between_frames_and_no_frame_of_delay(
    from_rate: int, to_rate: int
) -> None:
    """Every rate change a call makes (input to the VAD's 16 kHz, output to Opus's 48 kHz and
    to the phone's 8 kHz): frames of any size come out as the whole stream resampled at once,
    later by under 1.5 ms; 20 ms frames stay 20 ms frames."""
    from voicebot.audio import StreamResampler, resample

    rng = np.random.default_rng(1)
    x = rng.standard_normal(from_rate).astype(np.float32) * 0.1
    stream = StreamResampler(from_rate, to_rate)
    pieces, start = [], 0
    while start < x.size:
        size = int(rng.integers(1, from_rate // 25))
        pieces.append(stream(x[start : start + size]))
        start += size
    y = np.concatenate(pieces)
    assert y.size == x.size * to_rate // from_rate
    assert stream.lag / from_rate < 0.0015
    whole = resample(np.concatenate((np.zeros(stream.lag, np.float32), x)), from_rate, to_rate)
    np.testing.assert_allclose(y, whole[: y.size], atol=1e-6)
    frames = StreamResampler(from_rate, to_rate)
    frame = from_rate // 50
    assert {frames(x[i : i + frame]).size for i in range(0, x.size, frame)} == {to_rate // 50}
    # Resampling each frame on its own, as calls did, leaves a step at every frame edge.
    if from_rate != to_rate:
        framewise = np.concatenate(
            [resample(x[i : i + frame], from_rate, to_rate) for i in range(0, x.size, frame)]
        )
        plain = resample(x, from_rate, to_rate)
        assert np.max(np.abs(framewise - plain)) > 0.01


class _Packet:
    def __init__(self, sequence_number: int) -> None:
        self.sequence_number = sequence_number
        self.timestamp = sequence_number * 960
        self._data = bytes([sequence_number % 256])


def test_the_servers_input_buffer_passes_packets_on_as_they_arrive() -> None:
    from aiortc.jitterbuffer import JitterBuffer

    from voicebot.server.rtc_signalling import ArrivalOrderBuffer

    def frames(buffer: Any, order: list[int]) -> list[int | None]:
        out = [buffer.add(_Packet(p))[1] for p in order]
        return [None if f is None else f.timestamp // 960 for f in out]

    # wraps around; 1 comes late (dropped: the VAD has moved on), 2 comes twice
    order = [65533, 65534, 65535, 0, 2, 1, 2, 3]
    assert frames(ArrivalOrderBuffer(), order) == [65533, 65534, 65535, 0, 2, None, None, 3]
    # aiortc's hands a frame out only once the 4 packets after it are in: 80 ms
    aiortc = JitterBuffer(capacity=16, prefetch=4)
    assert frames(aiortc, list(range(6))) == [None, None, None, None, 0, 1]


def test_a_handler_tuned_for_webrtc_hears_each_frame_and_speaks_at_48k() -> None:
    import fractions

    import av

    from tests import fakes
    from voicebot.transports.fastrtc import VoiceHandler

    def frames(handler: VoiceHandler) -> list[int]:
        sizes = []
        for i in range(4):
            pcm = np.zeros((1, 2 * FRAME), np.int16)  # what aiortc decodes: 48 kHz stereo
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
            frame.sample_rate, frame.pts = 48000, i * FRAME
            frame.time_base = fractions.Fraction(1, 48000)
            sizes.append(sum(out.samples for out in handler.resample(frame)))
        return sizes

    runtime = fakes.runtime()
    # FastRTC's own: 960 samples at 16 kHz, the caller heard in 60 ms batches
    assert frames(VoiceHandler(runtime, greet=False)) == [0, 0, 0, 960]
    tuned = VoiceHandler(runtime, greet=False)
    tuned.tune_for_webrtc()
    assert frames(tuned) == [304, 320, 320, 320]  # 20 ms each; 1 ms of resampler delay
    assert (tuned.output_sample_rate, tuned.output_frame_size) == (48000, 960)


def test_the_input_buffer_is_swapped_on_a_real_peer_connection_and_a_miss_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import logging

    from aiortc import RTCPeerConnection

    from voicebot.server import rtc_signalling
    from voicebot.server.rtc_signalling import ArrivalOrderBuffer, unbuffer_input

    async def swap() -> Any:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        try:
            assert unbuffer_input(pc)
            return pc.getTransceivers()[0].receiver._RTCRtpReceiver__jitter_buffer
        finally:
            await pc.close()

    assert isinstance(asyncio.run(swap()), ArrivalOrderBuffer)

    class Transceiver:
        kind = "audio"
        receiver = object()  # an aiortc that keeps its buffer elsewhere

    class Pc:
        def getTransceivers(self) -> list[Transceiver]:
            return [Transceiver()]

    caplog.set_level(logging.INFO, logger="voicebot.server.rtc_signalling")
    rtc_signalling._missing_buffer_logged = False
    assert not unbuffer_input(Pc()) and not unbuffer_input(Pc())
    assert [r.getMessage() for r in caplog.records] == [
        "aiortc's receiver has no _RTCRtpReceiver__jitter_buffer: WebRTC input keeps its 80 ms "
        "buffer"
    ]


def _interrupted_call(answer_at: float) -> CallTrace:
    """A call at 20 ms frames from t = 100 s: the reply queued at 103 s plays until 105.2 s,
    0.2 s into an interruption spoken from 105 s to 106 s; the answer to the interruption is
    queued at ``answer_at`` and plays from then on."""
    frame = 320
    trace = CallTrace(rate=16000, frame_samples=frame, t0=100.0)
    trace.input_times = [100.0 + 0.02 * i for i in range(500)]
    trace.interruption_start_sample = 5 * 16000
    trace.interruption_end_sample = 6 * 16000
    silence = np.zeros(480, np.float32)
    reply_frames = [103.0 + 0.02 * i for i in range(111)]  # until 105.2 s
    answer_frames = [answer_at + 0.02 * i for i in range(50)]
    trace.queued = [(103.0, 0), (answer_at, len(reply_frames))]
    trace.played = [(at, silence) for at in [*reply_frames, *answer_frames]]
    trace.played_numbers = list(range(len(trace.played)))
    return trace


@pytest.mark.parametrize("answer_at", [106.16, 106.6])
def test_barge_in_stop_ends_where_the_answer_to_the_interruption_starts(
    answer_at: float,
) -> None:
    """The interrupted reply stopped 200 ms into the interruption, whether the answer to it
    plays at a 160 ms close (prepared from the draft) or later."""
    trace = _interrupted_call(answer_at)
    ends = interrupted_reply_end([answer_at], trace.wall_time(trace.interruption_end_sample))
    assert ends == pytest.approx(min(answer_at, 106.25))
    m = Measurement(pipeline="ours", item="en13", language="en", repeat=0)
    reply = Answer(102.5, "Tell me a story.", True, lambda _: None, 103.0)
    measure_barge_in(m, trace, Reference(speech_end=40000, interruption_start=0), reply, ends)
    assert m.bargein_stop_ms == pytest.approx(200.0, abs=0.5), m.notes


def test_barge_in_stop_of_the_baseline_waits_for_its_answer() -> None:
    """The baseline's frames are its own until its next answer starts: without one, all."""
    trace = _interrupted_call(107.0)
    assert interrupted_reply_end([107.0], None) == 107.0
    assert interrupted_reply_end([], None) == float("inf")
    m = Measurement(pipeline="baseline", item="en13", language="en", repeat=0)
    reply = Answer(102.5, "Tell me a story.", True, lambda _: None, 103.0)
    measure_barge_in(m, trace, Reference(speech_end=40000, interruption_start=0), reply, 1e9)
    assert m.bargein_stop_ms == pytest.approx(2980.0, abs=0.5)  # the answer's frames too


def test_reply_stall_counts_the_pauses_inside_the_answer_before_the_interruption() -> None:
    """The reply of ``_interrupted_call`` with its audio running out twice: 150 ms after its
    first second and 30 ms later on (scheduling, not counted); the answer
    to the interruption (after the cutoff) and a gap before the reply are not the reply's."""
    trace = _interrupted_call(106.6)
    silence = trace.played[0][1]
    times = [at for at, _ in trace.played]
    times = [at + (0.15 if at > 104.0 else 0.0) + (0.03 if at > 104.5 else 0.0) for at in times]
    trace.played = [(99.0, silence), *((at, silence) for at in times)]
    cutoff = trace.wall_time(trace.interruption_start_sample)
    assert reply_stall_ms(trace, 103.0, cutoff) == pytest.approx(150.0, abs=0.5)
    assert reply_stall_ms(trace, 104.1, cutoff) == pytest.approx(0.0)
    assert reply_stall_ms(trace, None, cutoff) is None
