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

from tests.support_voice import joe, say
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
    rate, samples = say(joe(joe_voice_path), text)
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


@pytest.fixture(scope="module")
def table_for_four(joe_voice_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ "I would like to book a table for," / "four people on Saturday evening." """
    sentence = _speech(
        joe_voice_path, "I would like to book a table for, four people on Saturday evening."
    )
    return _split_at_comma(sentence)


def test_complete_and_unfinished_english(
    smart_turn: SmartTurn, table_for_four: tuple[np.ndarray, np.ndarray]
) -> None:
    tail = np.zeros(1536, np.float32)  # the 96 ms of silence after which the model is asked
    first, second = table_for_four
    whole = np.concatenate((first, np.zeros(8000, np.float32), second, tail))
    assert smart_turn.complete_probability(whole) > 0.5
    assert smart_turn.complete_probability(np.concatenate((first, tail))) < 0.5


def test_detector_with_the_model_waits_through_a_mid_sentence_pause(
    smart_turn: SmartTurn, table_for_four: tuple[np.ndarray, np.ndarray]
) -> None:
    first, second = table_for_four
    pause = np.zeros(int(0.9 * 16000), np.float32)
    audio = np.concatenate(
        (np.zeros(8000, np.float32), first, pause, second, np.zeros(32000, np.float32))
    )
    config = TurnConfig(speculative_silence_ms=0)
    with_model = TurnDetector(config, SileroVad().stream(), turn_end=smart_turn)
    turns = [e for e in with_model.push(audio) if isinstance(e, UserTurn)]
    assert len(turns) == 1, [t.closed_sample / 16000 for t in turns]
    assert (turns[0].closed_sample - turns[0].speech_end_sample) / 16000 < 0.3
    silence_only = TurnDetector(config, SileroVad().stream())
    assert len([e for e in silence_only.push(audio) if isinstance(e, UserTurn)]) == 2


def test_offline_download_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"huggingface\.co/pipecat-ai/smart-turn-v3") as info:
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
