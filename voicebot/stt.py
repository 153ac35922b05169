"""Speech to text: faster-whisper (CTranslate2) behind a one-method ``Transcriber``.

The model is loaded once, in the constructor, and shared by every call; faster-whisper's
``WhisperModel`` with ``num_workers > 1`` runs that many transcriptions in parallel from
different threads. ``transcribe`` blocks (it consumes faster-whisper's lazy segment
generator), so call it from a worker thread, never on the event loop.

Short window (off in the app unless ``VOICEBOT_STT_SHORT_WINDOW`` is set): faster-whisper
pads every clip to whisper's 30 s window, so a two-second turn costs as much encoder time as a
thirty-second one. CTranslate2's whisper ``encode`` and ``generate`` accept shorter features,
so for a language with a measured padding (``SHORT_WINDOW_PADDING_S``) the utterance's
features plus that much silence can be decoded instead. Too little padding makes whisper loop
or stop early; such a degenerate transcript (see ``degenerate_reason``) is thrown away and the
clip is transcribed again with the full window. It stays opt-in because it also changes words
that are not degenerate: every speech frame's encoder state attends to the padding too, so
the short window's states differ from the full window's whatever the padding length, and
tiny.en then hears a rare word differently ("Eiffel" as "Eival", "France" as "friends");
docs/benchmarks.md has the measurements.

What the app does instead by default is use the short window as a *draft* (``draft``): at a
pause that may end the turn, the call decodes the short window first and starts preparing
its answer on that text while the full window transcribes the same audio; the answer plays
only if both say the same words (``same_words``). The turn's text is always the full
window's, so accuracy is the full window's and the short window only buys time. This module
is the only one that touches faster-whisper's model internals.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from voicebot.audio import Audio, MonoAudio, Samples, resample, to_mono_float32
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
FULL_WINDOW_S = 30.0
"""whisper's window: what faster-whisper pads every clip to."""
_FRAMES_PER_S = 100  # whisper's log-mel hop is 10 ms
SHORT_WINDOW_PADDING_S: Mapping[str, float] = {"en": 1.0, "ja": 3.0}
"""Silence decoded after the utterance with the short window, per language, chosen with
``scripts/measure_stt_window.py`` on the bench corpus (docs/benchmarks.md). Languages not
listed always use the full window."""
DRAFT_LANGUAGES = frozenset({"en"})
"""Languages ``draft`` serves, chosen with ``voicebot bench --preemptive on,nodraft``
(docs/benchmarks.md). Japanese is left out: whisper base's short window writes other kana
and kanji than the full window often enough (子ども/子供) that half the drafts were dropped,
and its +3 s window saves too little: v2v p50 1568 ms with drafts against 1091 without."""
COMPRESSION_RATIO_LIMIT = 2.4
"""whisper's own threshold: text that gzip shrinks more than this is a repetition loop."""
_REPEATED_UNITS = (
    re.compile(r"(.{2,}?)\1{3,}"),  # a short word four times in a row
    re.compile(r"(.{6,}?)\1{2,}"),  # a longer one three times
    re.compile(r"(.{15,}?)\1"),  # a phrase or sentence twice
)
# Whisper's loops say a word, a phrase or the whole sentence again and again; looked for in
# the text without case, spaces or punctuation, where "Can you help me? Can you help me"
# repeats exactly. Legitimate turns almost never do that.


class Transcriber(Protocol):
    """One utterance in, its text out."""

    name: str

    def transcribe(self, audio: MonoAudio, language: str | None = None) -> str:
        """Text of ``audio``; ``language`` is an ISO 639-1 code, None to detect it."""
        ...

    def draft(self, audio: MonoAudio, language: str | None = None) -> str | None:
        """A quicker, less certain text of ``audio`` to start preparing an answer on while
        ``transcribe`` runs, or None where there is none. Only ``transcribe``'s text is kept:
        an answer prepared on a draft is used only if the two say the same words."""
        ...


def same_words(draft: str, text: str) -> bool:
    """The two transcripts say the same words: compared without case, spaces or
    punctuation ("to-night" and "tonight", "Hello there" and "Hello there." agree)."""

    def letters(value: str) -> str:
        return "".join(ch for ch in unicodedata.normalize("NFKC", value).lower() if ch.isalnum())

    return letters(draft) == letters(text)


@dataclass(frozen=True)
class WindowResult:
    """One decoding of a clip, as ``WhisperTranscriber.decode`` returns it."""

    text: str
    window_s: float
    """Length of the features decoded: the clip plus padding, or the full 30 s window."""
    degenerate: str | None = None
    """Why the short-window transcript was thrown away (None: it was kept, or full window)."""
    fell_back: bool = False
    """The text comes from the full window after a degenerate short-window transcript."""


def degenerate_reason(text: str, tokens: int, max_tokens: int) -> str | None:
    """Why ``text`` (``tokens`` long, out of a budget of ``max_tokens``) looks like a whisper
    failure rather than speech, or None when it looks fine.

    The tests whisper's own temperature fallback uses (compression ratio), plus a direct
    look for a repeated unit, the token budget running out (a loop that never ends), and
    an empty transcript (decoding that stopped at once, which too little padding causes;
    the pipeline only transcribes audio its VAD heard speech in).
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    if tokens >= max_tokens:
        return "token budget exhausted"
    encoded = stripped.encode("utf-8")
    ratio = len(encoded) / len(zlib.compress(encoded))
    if ratio > COMPRESSION_RATIO_LIMIT:
        return f"compression ratio {ratio:.2f}"
    letters = "".join(ch for ch in unicodedata.normalize("NFKC", stripped).lower() if ch.isalnum())
    for pattern in _REPEATED_UNITS:
        repeated = pattern.search(letters)
        if repeated is not None:
            return f"repeated {repeated.group(1)!r}"
    return None


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
        short_window: bool = True,
        short_window_padding_s: Mapping[str, float] = SHORT_WINDOW_PADDING_S,
    ) -> None:
        """``short_window``: decode only the utterance plus ``short_window_padding_s`` of
        silence for the languages that table names (the module docstring says why). The app
        passes ``VOICEBOT_STT_SHORT_WINDOW``, off by default; evaluations that want speed
        over the last word of accuracy keep this default; with it off, ``draft`` gives the
        short window's text."""
        try:
            from faster_whisper import WhisperModel, available_models
        except ModuleNotFoundError as e:
            raise ConfigError(
                "speech to text needs faster-whisper: pip install faster-whisper"
            ) from e

        resolved, default_compute = resolve_device(device)
        compute = default_compute if compute_type == "auto" else compute_type
        if resolved == "cuda":
            from voicebot import cuda

            cuda.preload()  # cuBLAS/cuDNN from the [gpu] extra's wheels, if installed
        source = _model_source(model, available_models())
        self.name = Path(source).name if Path(source).is_dir() else model
        source = _fetch_model(source)
        self.device = resolved
        self.compute_type = compute
        self.beam_size = beam_size
        self.short_window = short_window
        self._workers = max(1, num_workers)
        self._passes = 0  # decodings in flight, all calls together
        self._passes_lock = threading.Lock()
        self._padding_s = dict(short_window_padding_s)
        for lang, padding in self._padding_s.items():
            if not 0.0 <= padding < FULL_WINDOW_S:
                raise ConfigError(
                    f"short-window padding for {lang!r} must be within 0-30 s, got {padding}"
                )
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
            if resolved == "cuda":
                from voicebot import cuda

                absent = cuda.missing()
                if absent:
                    raise ConfigError(
                        f"cannot load whisper model {model!r} on CUDA: {cuda.install_hint(absent)}"
                    ) from e
            raise ConfigError(
                f"cannot load whisper model {model!r} on {resolved}/{compute}: {e}. "
                f"Set {MODEL_SETTING} to a faster-whisper size name (tiny, base, small, "
                "large-v3-turbo, ...) or a CTranslate2 model directory"
            ) from e
        # English-only (.en) checkpoints cannot transcribe or detect anything else.
        self.multilingual = bool(self._model.model.is_multilingual)
        logger.info(
            "whisper %s loaded on %s/%s in %.2f s (multilingual=%s, %d workers x %s threads)",
            self.name,
            resolved,
            compute,
            time.perf_counter() - started,
            self.multilingual,
            num_workers,
            cpu_threads or "default",
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
        lang = _normalise_language(language) if self.multilingual else "en"
        padding = self._padding_s.get(lang or "") if self.short_window else None
        return self.decode(audio, language, padding_s=padding).text

    def draft(self, audio: Audio, language: str | None = None) -> str | None:
        """The short window's text, as a draft for ``transcribe``'s full window: None when the
        short window is already what ``transcribe`` does, the language is not one of
        ``DRAFT_LANGUAGES`` (or is to be detected), the clip is too long to gain, or the
        draft looks degenerate. The policy starts a preemptive answer on it and keeps that
        answer only if the full window hears the same words, so the turn's text (and the WER)
        is the full window's and the short window only buys time.

        None, too, while every worker is busy with other calls' passes: a draft then would
        queue and delay the transcripts those calls wait for."""
        if self.short_window or self.passes_in_flight >= self._workers:
            return None
        prepared = self._prepare(audio, language)
        if prepared is None:
            return None
        samples, lang = prepared
        padding = self._padding_s.get(lang or "")
        duration = samples.shape[-1] / WHISPER_SAMPLE_RATE
        if padding is None or lang not in DRAFT_LANGUAGES or duration + padding >= FULL_WINDOW_S:
            return None
        started = time.perf_counter()
        text, degenerate = self._decode_short(samples, lang, padding)
        logger.debug(
            "stt %s: draft of %.2f s audio in %.2f s (%s)",
            self.name,
            duration,
            time.perf_counter() - started,
            degenerate or "kept",
        )
        return text if degenerate is None else None

    @property
    def passes_in_flight(self) -> int:
        """Decodings running now, every call's together."""
        return self._passes

    def _passes_started(self) -> None:
        with self._passes_lock:
            self._passes += 1

    def _passes_ended(self) -> None:
        with self._passes_lock:
            self._passes -= 1

    def _prepare(self, audio: Audio, language: str | None) -> tuple[Samples, str | None] | None:
        """16 kHz mono samples and the language to decode them in; None: too short to try."""
        rate, samples = to_mono_float32(audio)
        if samples.shape[-1] < MIN_AUDIO_S * rate:
            return None
        samples = resample(samples, rate, WHISPER_SAMPLE_RATE)
        lang = _normalise_language(language)
        if not self.multilingual:
            if lang not in (None, "en") and not self._warned_language:
                self._warned_language = True  # once, not every turn
                logger.warning("whisper %s is English-only; ignoring language %r", self.name, lang)
            lang = "en"
        return samples, lang

    def decode(
        self, audio: Audio, language: str | None = None, *, padding_s: float | None = None
    ) -> WindowResult:
        """Transcribe ``audio`` with ``padding_s`` of silence after it (None: whisper's full
        30 s window). A degenerate short-window transcript is redone with the full window.

        A clip whose language is to be detected, or that is too long to gain anything,
        uses the full window whatever ``padding_s`` says.
        """
        prepared = self._prepare(audio, language)
        if prepared is None:
            return WindowResult("", 0.0)
        samples, lang = prepared
        duration = samples.shape[-1] / WHISPER_SAMPLE_RATE
        started = time.perf_counter()
        if padding_s is not None and lang is not None and duration + padding_s < FULL_WINDOW_S:
            text, degenerate = self._decode_short(samples, lang, padding_s)
            if degenerate is None:
                logger.debug(
                    "stt %s: %.2f s audio in %.2f s (short window +%.1f s), language=%s",
                    self.name,
                    duration,
                    time.perf_counter() - started,
                    padding_s,
                    lang,
                )
                return WindowResult(text, duration + padding_s)
            logger.info(
                "stt %s: short-window transcript degenerate (%s); transcribing again with the "
                "full window",
                self.name,
                degenerate,
            )
            full = self._decode_full(samples, lang, started)
            return WindowResult(full, FULL_WINDOW_S, degenerate=degenerate, fell_back=True)
        return WindowResult(self._decode_full(samples, lang, started), FULL_WINDOW_S)

    def _decode_short(
        self, samples: Samples, lang: str, padding_s: float
    ) -> tuple[str, str | None]:
        """(text, why it is degenerate or None) from the utterance's features plus padding."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        budget = max_new_tokens(samples.shape[-1] / WHISPER_SAMPLE_RATE)
        self._passes_started()
        try:
            # The same features faster-whisper computes (its last frame dropped, as it does),
            # zero-padded like its 30 s window but only by padding_s.
            features = self._model.feature_extractor(samples)[..., :-1]
            frames = min(
                features.shape[-1] + round(padding_s * _FRAMES_PER_S),
                int(FULL_WINDOW_S * _FRAMES_PER_S),
            )
            features = pad_or_trim(features, frames)
            tokenizer = Tokenizer(
                self._model.hf_tokenizer, self.multilingual, task="transcribe", language=lang
            )
            prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
            encoded = self._model.encode(features)
            result = self._model.model.generate(
                encoded,
                [prompt],
                beam_size=self.beam_size,
                max_length=len(prompt) + budget,
                suppress_blank=True,
                suppress_tokens=get_suppressed_tokens(tokenizer, (-1,)),
            )[0]
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
            text = str(tokenizer.decode(tokens)).strip()
        except Exception as e:
            raise StageError("stt", f"whisper {self.name} failed: {e}") from e
        finally:
            self._passes_ended()
        return text, degenerate_reason(text, len(tokens), budget)

    def _decode_full(self, samples: Samples, lang: str | None, started: float) -> str:
        self._passes_started()
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
        finally:
            self._passes_ended()
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
