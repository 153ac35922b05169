"""Smart Turn v3.2 behind ``TurnEndModel``, with the real model from the pipecat-ai wheel.

The runtime downloads the model from its Hugging Face repo; tests never touch a model hub.
The same file ships inside the ``pipecat-ai`` wheel, so the fixture fetches that wheel from
PyPI once (``pip download --no-deps``, pinned, into pytest's cache) and extracts the ONNX
file and the reference feature extractor. pipecat-ai is not a dependency of voicebot.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.support_voice import say_exactly
from voicebot.audio import resample
from voicebot.endpointing import (
    SMART_TURN_FILE,
    SMART_TURN_SHA256,
    SmartTurn,
    TurnEndModel,
    last_window,
    load_turn_end_model,
    log_mel_features,
    smart_turn_model_path,
)
from voicebot.errors import ConfigError
from voicebot.turns import TurnConfig, TurnDetector, UserTurn
from voicebot.vad import SileroVad

PIPECAT_WHEEL = "pipecat-ai==1.14.0"
_INSIDE = "pipecat/audio/turn/smart_turn/"


@pytest.fixture(scope="module")
def smart_turn_files(request: pytest.FixtureRequest) -> Path:
    """Directory holding smart-turn-v3.2-cpu.onnx and pipecat's _whisper_features.py."""
    cache = Path(request.config.cache.mkdir("smart-turn-v3.2"))
    model = cache / SMART_TURN_FILE
    features = cache / "_whisper_features.py"
    if not (model.is_file() and features.is_file()):
        wheels = cache / "wheel"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(wheels),
                PIPECAT_WHEEL,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"cannot fetch {PIPECAT_WHEEL} from PyPI: {done.stderr}"
        (wheel,) = wheels.glob("pipecat_ai-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            model.write_bytes(archive.read(_INSIDE + "data/" + SMART_TURN_FILE))
            features.write_bytes(archive.read(_INSIDE + "_whisper_features.py"))
    assert hashlib.sha256(model.read_bytes()).hexdigest() == SMART_TURN_SHA256
    return cache


@pytest.fixture(scope="module")
def smart_turn(smart_turn_files: Path) -> SmartTurn:
    return SmartTurn(smart_turn_files / SMART_TURN_FILE)


def _reference_features(directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_pipecat_features", directory / "_whisper_features.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_features_match_the_reference_extractor(smart_turn_files: Path) -> None:
    reference = _reference_features(smart_turn_files)
    rng = np.random.default_rng(1)
    for seconds in (0.3, 3.0, 9.5):
        audio = (0.2 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        window = last_window(audio)
        assert window.size == 8 * 16000
        ours = log_mel_features(window)
        theirs = reference.compute_whisper_log_mel_features(window, do_normalize=True)
        assert ours.shape == theirs.shape == (80, 800)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_satisfies_protocol(smart_turn: SmartTurn) -> None:
    model: TurnEndModel = smart_turn
    assert model is smart_turn


def _speech(joe_voice_path: Path, text: str) -> np.ndarray:
    """``text`` in the joe voice at 16 kHz, the same audio every run (with piper's sampling
    noise on, a rare rendition of "I need a room with," sounded finished to the model)."""
    rate, samples = say_exactly(joe_voice_path, text)
    return resample(samples, rate, 16000)


def _split_at_comma(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clip before and after its longest inner quiet stretch (the comma's pause), so the
    words before it keep the intonation of a sentence that goes on."""
    frame = 160
    energy = np.sqrt(np.mean(audio[: audio.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    quiet = energy < energy.max() * 0.01
    voiced = np.flatnonzero(~quiet)
    best, start = (0, 0), None
    for i in range(int(voiced[0]), int(voiced[-1]) + 1):
        if quiet[i] and start is None:
            start = i
        elif not quiet[i] and start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    assert best[1] - best[0] >= 5, "no pause found at the comma"
    return audio[: best[0] * frame], audio[best[1] * frame :]


# Smart Turn hears these first halves as unfinished with a wide margin (p < 0.1 with the joe
# voice; piper's sampling noise moves it a little between syntheses). The issue's own example,
# "I would like to book a table for, …", is one it gets wrong with this voice (p ≈ 0.9):
# the measured cut-in rate in docs/benchmarks.md counts such misses.
UNFINISHED = (
    "I need a room with, two beds and a view of the sea.",
    "I was wondering if you could, help me change my flight.",
)


@pytest.fixture(scope="module")
def room_with(joe_voice_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ "I need a room with," / "two beds and a view of the sea." """
    return _split_at_comma(_speech(joe_voice_path, UNFINISHED[0]))


def test_complete_and_unfinished_english(smart_turn: SmartTurn, joe_voice_path: Path) -> None:
    threshold = TurnConfig().turn_end_threshold
    tail = np.zeros(1024, np.float32)  # the 64 ms of silence after which the model is asked
    for text in ("Can you tell me when the museum opens?", "That sounds great, thank you."):
        complete = np.concatenate((_speech(joe_voice_path, text), tail))
        assert smart_turn.complete_probability(complete) >= threshold, text
    for text in UNFINISHED:
        first, _ = _split_at_comma(_speech(joe_voice_path, text))
        assert smart_turn.complete_probability(np.concatenate((first, tail))) < threshold, text


def _turns(model: SmartTurn | None, audio: np.ndarray) -> list[UserTurn]:
    detector = TurnDetector(TurnConfig(speculative_silence_ms=0), SileroVad().stream(), model)
    return [e for e in detector.push(audio) if isinstance(e, UserTurn)]


def test_detector_with_the_model_ends_a_complete_turn_quickly(
    smart_turn: SmartTurn, joe_voice_path: Path
) -> None:
    speech = _speech(joe_voice_path, "Can you tell me when the museum opens?")
    audio = np.concatenate((np.zeros(8000, np.float32), speech, np.zeros(32000, np.float32)))
    (turn,) = _turns(smart_turn, audio)
    assert (turn.closed_sample - turn.speech_end_sample) / 16000 <= 0.16 + 0.033
    assert turn.complete_probability is not None and turn.complete_probability >= 0.7
    (plain,) = _turns(None, audio)  # silence alone: 320 ms
    assert (plain.closed_sample - plain.speech_end_sample) / 16000 >= 0.3


def test_detector_with_the_model_waits_through_a_mid_sentence_pause(
    smart_turn: SmartTurn, room_with: tuple[np.ndarray, np.ndarray]
) -> None:
    first, second = room_with
    pause = np.zeros(int(0.9 * 16000), np.float32)
    audio = np.concatenate(
        (np.zeros(8000, np.float32), first, pause, second, np.zeros(40000, np.float32))
    )
    turns = _turns(smart_turn, audio)
    assert len(turns) == 1, [t.closed_sample / 16000 for t in turns]
    assert turns[0].audio.size >= first.size + pause.size + second.size  # both halves
    assert len(_turns(None, audio)) == 2  # silence alone answers in the pause


def test_offline_download_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"Hugging Face repo pipecat-ai/smart-turn-v3") as info:
        smart_turn_model_path(tmp_path)
    assert "VOICEBOT_TURN_END_MODEL" in str(info.value)


def test_wrong_file_is_a_config_error(tmp_path: Path) -> None:
    fake = tmp_path / SMART_TURN_FILE
    fake.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not the Smart Turn"):
        SmartTurn(fake)
    with pytest.raises(ConfigError, match="not found"):
        SmartTurn(tmp_path / "missing.onnx")


def test_load_turn_end_model_choices(
    smart_turn_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    assert load_turn_end_model("off") is None
    assert isinstance(load_turn_end_model(str(smart_turn_files / SMART_TURN_FILE)), SmartTurn)
    with pytest.raises(ConfigError, match="not found"):
        load_turn_end_model(str(tmp_path / "nothing.onnx"))
    # The default, offline on first start: silence timing, and a warning that says why.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.INFO, logger="voicebot.endpointing")
    assert load_turn_end_model("smart-turn", tmp_path) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "silence alone" in warnings[0].getMessage()
