"""SileroVad against the real Silero v6 model shipped in faster-whisper's wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile

import voicebot.vad as vad_module
from voicebot.audio import resample, to_mono_float32
from voicebot.errors import ConfigError
from voicebot.vad import (
    VAD_SAMPLE_RATE,
    WINDOW_SAMPLES,
    SileroVad,
    VadStream,
    VoiceActivityModel,
    default_silero_path,
)


@pytest.fixture(scope="module")
def vad(silero_model_path: Path) -> SileroVad:
    return SileroVad(silero_model_path)


@pytest.fixture(scope="module")
def speech_16k() -> np.ndarray:
    """20.75 s of English speech (fastrtc's test file, 24 kHz) at 16 kHz."""
    spec = importlib.util.find_spec("fastrtc")
    assert spec is not None and spec.origin is not None
    wav = Path(spec.origin).parent / "speech_to_text" / "test_file.wav"
    rate, samples = scipy.io.wavfile.read(wav)
    rate, mono = to_mono_float32((rate, samples))
    return resample(mono, rate, VAD_SAMPLE_RATE)


def windows(samples: np.ndarray) -> list[np.ndarray]:
    count = len(samples) // WINDOW_SAMPLES
    return [samples[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES] for i in range(count)]


def probabilities(stream: VadStream, samples: np.ndarray) -> np.ndarray:
    return np.array([stream.probability(w) for w in windows(samples)])


def test_default_path_is_the_faster_whisper_asset(silero_model_path: Path) -> None:
    assert default_silero_path() == silero_model_path
    assert isinstance(SileroVad(), SileroVad)


def test_satisfies_protocol(vad: SileroVad) -> None:
    model: VoiceActivityModel = vad
    assert 0.0 <= model.stream().probability(np.zeros(WINDOW_SAMPLES, np.float32)) <= 1.0


def test_silence_and_low_noise_are_not_speech(vad: SileroVad) -> None:
    silence = np.zeros(VAD_SAMPLE_RATE, dtype=np.float32)
    assert probabilities(vad.stream(), silence).max() < 0.2
    noise = (np.random.default_rng(0).standard_normal(3 * VAD_SAMPLE_RATE) * 0.003).astype(
        np.float32
    )
    assert probabilities(vad.stream(), noise).max() < 0.3


def test_real_speech_is_speech(vad: SileroVad, speech_16k: np.ndarray) -> None:
    probs = probabilities(vad.stream(), speech_16k)
    # Pauses between sentences are real silence; most of a read paragraph is voiced.
    assert (probs > 0.5).mean() > 0.7
    assert probs.max() > 0.9


def test_matches_faster_whisper_batched_reference(vad: SileroVad, speech_16k: np.ndarray) -> None:
    """Streaming window by window equals faster-whisper's own batched use of the model."""
    from faster_whisper.vad import get_vad_model

    clip = speech_16k[: 100 * WINDOW_SAMPLES]
    reference = np.asarray(get_vad_model()(clip.copy())).reshape(-1)
    # faster-whisper zeroes the last 64 samples of the final window in place: skip that one.
    ours = probabilities(vad.stream(), clip)
    np.testing.assert_allclose(ours[:-1], reference[:-1], atol=1e-4)


def test_streams_are_independent(vad: SileroVad, speech_16k: np.ndarray) -> None:
    speech = windows(speech_16k[: 60 * WINDOW_SAMPLES])
    silence = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    fresh = vad.stream()
    fresh_probs = [fresh.probability(silence) for _ in range(5)]

    # Interleave: one stream hears speech, the other silence; the silent one must score
    # exactly like a stream that never shared the session with speech.
    talker, listener = vad.stream(), vad.stream()
    listener_probs = []
    for i, window in enumerate(speech):
        talker.probability(window)
        if i < 5:
            listener_probs.append(listener.probability(silence))
    assert listener_probs == pytest.approx(fresh_probs, abs=1e-6)

    # The talker carries its own state: the same silent window scores differently after speech.
    assert talker.probability(silence) != pytest.approx(fresh_probs[0], abs=1e-6)


def test_streams_in_threads_match_sequential(vad: SileroVad, speech_16k: np.ndarray) -> None:
    from concurrent.futures import ThreadPoolExecutor

    clips = [speech_16k[i * 16000 : (i + 2) * 16000] for i in range(4)]
    sequential = [probabilities(vad.stream(), clip) for clip in clips]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda clip: probabilities(vad.stream(), clip), clips))
    for a, b in zip(sequential, threaded, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("length", [0, 511, 513, 1024])
def test_wrong_window_length_raises(vad: SileroVad, length: int) -> None:
    with pytest.raises(ValueError, match="512"):
        vad.stream().probability(np.zeros(length, dtype=np.float32))


def test_stereo_window_raises(vad: SileroVad) -> None:
    with pytest.raises(ValueError, match="512"):
        vad.stream().probability(np.zeros((2, WINDOW_SAMPLES), dtype=np.float32))


def test_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        SileroVad(tmp_path / "nope.onnx")


def test_official_export_if_installed(speech_16k: np.ndarray) -> None:
    """The official silero-vad export (inputs input/state/sr) works the same way."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        pytest.skip("silero-vad wheel not installed (it needs torch to import; optional)")
    official = SileroVad(Path(spec.origin).parent / "data" / "silero_vad.onnx")
    probs = probabilities(official.stream(), speech_16k)
    assert (probs > 0.5).mean() > 0.7
    assert probabilities(official.stream(), np.zeros(8000, np.float32)).max() < 0.2


def test_module_has_no_loaded_model() -> None:
    """Importing the module must not load onnxruntime sessions (composition root does)."""
    assert not any(isinstance(v, SileroVad) for v in vars(vad_module).values())
