"""Speech to text: faster-whisper (CTranslate2) behind a one-method ``Transcriber``.

The model is loaded once, in the constructor, and shared by every call; faster-whisper's
``WhisperModel`` with ``num_workers > 1`` runs that many transcriptions in parallel from
different threads. ``transcribe`` blocks (it consumes faster-whisper's lazy segment
generator), so call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from voicebot.audio import Audio, MonoAudio, resample, to_mono_float32
from voicebot.console import step
from voicebot.errors import ConfigError, StageError

logger = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
MIN_AUDIO_S = 0.1
"""Shorter audio returns "" without running the model (whisper would only hallucinate)."""
MODEL_SETTING = "VOICEBOT_STT_MODEL / --stt-model"
_INSTALL_HINT = "speech to text needs faster-whisper: pip install faster-whisper"
# Written without spaces between words, so segments are joined without one.
_UNSPACED_LANGUAGES = frozenset({"ja", "zh", "yue"})
# "org/name" on the Hugging Face hub, which faster-whisper also accepts.
_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class Transcriber(Protocol):
    """One utterance in, its text out."""

    name: str

    def transcribe(self, audio: MonoAudio, language: str | None = None) -> str:
        """Text of ``audio``; ``language`` is an ISO 639-1 code, None to detect it."""
        ...


def resolve_device(device: str) -> tuple[str, str]:
    """``(device, default compute type)`` for "auto", "cpu" or "cuda".

    "auto" picks CUDA when CTranslate2 sees a GPU. float16 is the fast exact-enough type
    on GPUs; int8 is the fastest on CPUs, with negligible loss for whisper.
    """
    wanted = device.strip().lower()
    if wanted not in {"auto", "cpu", "cuda"}:
        raise ConfigError(f"unknown STT device {device!r}: use auto, cpu or cuda")
    if wanted == "auto":
        try:
            import ctranslate2
        except ModuleNotFoundError as e:
            raise ConfigError(
                "speech to text needs faster-whisper: pip install faster-whisper"
            ) from e
        wanted = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return wanted, ("float16" if wanted == "cuda" else "int8")


def default_model_name(device: str, language: str) -> str:
    """A whisper size that answers within a conversational turn on ``device``.

    Latency vs accuracy: on CPU every turn pays a full 30 s encoder pass (whisper pads), so
    we stay small: ``base.en`` (~0.5 s on 2 cores) for English, where the English-only
    models beat multilingual ones of the same size, and ``small`` for other languages,
    because base/tiny misread too much non-English speech. A GPU makes a bigger model
    affordable: ``small.en`` for English, and ``large-v3-turbo`` (large-v3's encoder with a
    4-layer decoder, close to large-v3's accuracy at a fraction of its decode time) for the
    rest.
    """
    resolved, _ = resolve_device(device)
    english = language.strip().lower().split("-")[0].split("_")[0] == "en"
    if resolved == "cuda":
        return "small.en" if english else "large-v3-turbo"
    return "base.en" if english else "small"


def _normalise_language(language: str | None) -> str | None:
    """ "ja-JP" / "en_US" -> "ja" / "en"; None or "" means detect."""
    if not language:
        return None
    return language.strip().lower().replace("_", "-").split("-")[0] or None


class WhisperTranscriber:
    """faster-whisper ``WhisperModel`` loaded once and shared by all calls."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        compute_type: str = "auto",
        cpu_threads: int = 0,
        num_workers: int = 2,
        beam_size: int = 1,
    ) -> None:
        try:
            from faster_whisper import WhisperModel, available_models
        except ModuleNotFoundError as e:
            raise ConfigError(
                "speech to text needs faster-whisper: pip install faster-whisper"
            ) from e

        resolved, default_compute = resolve_device(device)
        compute = default_compute if compute_type == "auto" else compute_type
        source = _model_source(model, available_models())
        self.name = Path(source).name if Path(source).is_dir() else model
        source = _fetch_model(source)
        self.device = resolved
        self.compute_type = compute
        self.beam_size = beam_size
        self._warned_language = False
        started = time.perf_counter()
        try:
            self._model: Any = WhisperModel(
                source,
                device=resolved,
                compute_type=compute,
                cpu_threads=cpu_threads,
                num_workers=num_workers,
            )
        except Exception as e:
            raise ConfigError(
                f"cannot load whisper model {model!r} on {resolved}/{compute}: {e}. "
                f"Set {MODEL_SETTING} to a faster-whisper size name (tiny, base, small, "
                "large-v3-turbo, ...) or a CTranslate2 model directory"
            ) from e
        # English-only (.en) checkpoints cannot transcribe or detect anything else.
        self.multilingual = bool(self._model.model.is_multilingual)
        logger.info(
            "whisper %s loaded on %s/%s in %.2f s (multilingual=%s)",
            self.name,
            resolved,
            compute,
            time.perf_counter() - started,
            self.multilingual,
        )

    def warm_up(self) -> None:
        """Transcribe 1 s of silence and a tone once, so the first real call is fast."""
        t = np.arange(WHISPER_SAMPLE_RATE, dtype=np.float32) / WHISPER_SAMPLE_RATE
        tone = (0.1 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        tone[: WHISPER_SAMPLE_RATE // 2] = 0.0
        started = time.perf_counter()
        # A fixed language skips detection, which would only add a second of start-up.
        self.transcribe((WHISPER_SAMPLE_RATE, tone), language="en")
        logger.info("whisper %s warmed up in %.2f s", self.name, time.perf_counter() - started)

    def transcribe(self, audio: Audio, language: str | None = None) -> str:
        """Text of ``audio`` (any rate, int16 or float32, mono or stereo); blocks."""
        rate, samples = to_mono_float32(audio)
        if samples.shape[-1] < MIN_AUDIO_S * rate:
            return ""
        samples = resample(samples, rate, WHISPER_SAMPLE_RATE)
        lang = _normalise_language(language)
        if not self.multilingual:
            if lang not in (None, "en") and not self._warned_language:
                self._warned_language = True  # once, not every turn
                logger.warning("whisper %s is English-only; ignoring language %r", self.name, lang)
            lang = "en"
        started = time.perf_counter()
        try:
            segments, info = self._model.transcribe(
                samples,
                language=lang,
                beam_size=self.beam_size,
                vad_filter=False,  # the pipeline's VAD already cut the utterance
                condition_on_previous_text=False,  # each turn stands alone; avoids loops
                without_timestamps=True,
                # No fallback to higher temperatures, and at most a generous speaking rate's
                # worth of tokens: a short, odd clip (an aizuchi, a cough) then costs one quick
                # pass instead of retries or a hallucinated loop of hundreds of tokens.
                temperature=0.0,
                max_new_tokens=max_new_tokens(samples.shape[-1] / WHISPER_SAMPLE_RATE),
            )
            # The generator decodes lazily: consume it here, inside the worker thread.
            texts = [segment.text.strip() for segment in segments]
        except Exception as e:
            raise StageError("stt", f"whisper {self.name} failed: {e}") from e
        detected = lang or getattr(info, "language", None)
        separator = "" if detected in _UNSPACED_LANGUAGES else " "
        text = separator.join(t for t in texts if t).strip()
        logger.debug(
            "stt %s: %.2f s audio in %.2f s, language=%s",
            self.name,
            samples.shape[-1] / WHISPER_SAMPLE_RATE,
            time.perf_counter() - started,
            detected,
        )
        return text


def max_new_tokens(duration_s: float) -> int:
    """A token budget for ``duration_s`` of speech: ~12 tokens/s (fast Japanese) plus slack,
    within whisper's 448-token context."""
    return min(400, 16 + int(12 * duration_s))


_MODEL_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.bin",
    "tokenizer.json",
    "vocabulary.*",
]
"""What faster-whisper itself fetches of a model repository."""


def _fetch_model(source: str) -> str:
    """A local directory for ``source``: the cached copy, else downloaded with a progress bar.

    faster-whisper downloads with huggingface_hub's progress bars switched off, so a first
    start would sit silent for minutes; we download the same files ourselves, bars on.
    """
    if Path(source).is_dir():
        return source
    from faster_whisper.utils import _MODELS, download_model

    try:
        return str(download_model(source, local_files_only=True))
    except Exception:  # not in the cache yet (huggingface_hub raises several kinds)
        pass
    import huggingface_hub

    repo_id = source if _HUB_REPO_ID.fullmatch(source) else _MODELS.get(source, source)
    step("  STT       downloading whisper %s from the Hugging Face hub (first start)", source)
    try:
        return str(huggingface_hub.snapshot_download(repo_id, allow_patterns=_MODEL_FILES))
    except Exception as e:
        raise ConfigError(
            f"cannot download whisper model {source!r} ({e}); check the network, or set "
            f"{MODEL_SETTING} to a local CTranslate2 model directory"
        ) from e


def _model_source(model: str, size_names: list[str]) -> str:
    """The local directory as a str (CTranslate2 rejects a Path), or a size name / hub id."""
    if not model.strip():
        raise ConfigError(f"no whisper model given: set {MODEL_SETTING}")
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model in size_names:
        return model
    looks_like_path = model.startswith(("/", ".", "~")) or path.exists()
    if not looks_like_path and _HUB_REPO_ID.fullmatch(model):
        return model
    raise ConfigError(
        f"whisper model {model!r} not found: no such directory, and not a faster-whisper size "
        f"name ({', '.join(size_names)}). Set {MODEL_SETTING} to a size name or to a "
        "CTranslate2 model directory"
    )
