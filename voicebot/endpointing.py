"""Does the turn sound finished? A model that hears it, behind a one-method ``TurnEndModel``.

Silence alone cannot tell "I'd like a table for… (pause) …four" from a finished sentence.
``turns.TurnDetector`` asks a ``TurnEndModel`` once per pause and, with its answer, ends a
turn that sounds complete after a short silence and waits longer for one that does not.

``SmartTurn`` runs Smart Turn v3.2 (pipecat-ai/smart-turn, BSD-2-Clause): an 8.7 MB int8
ONNX model over the last 8 s of 16 kHz audio (whisper log-mel features) that outputs the
probability that the turn is complete; 23 languages, Japanese included. ~50 ms per call on
one CPU thread. ``smart_turn_model_path`` fetches the file from its Hugging Face repo the
first time, into the hub cache.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from voicebot.audio import Samples
from voicebot.errors import ConfigError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SMART_TURN_REPO = "pipecat-ai/smart-turn-v3"
SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"
SMART_TURN_REVISION = "f766f81d3cfdf7737ac64aad813d91bbfd56bf93"
"""The "Smart Turn v3.2" commit; pinned so the weights the measurements used are the ones
users get."""
SMART_TURN_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
_WINDOW_S = 8
_N_FFT = 400
_HOP = 160
_N_MELS = 80


class TurnEndModel(Protocol):
    """How likely the turn in ``audio`` (16 kHz mono float32, the turn so far) is complete."""

    def complete_probability(self, audio: Samples) -> float:
        """0 (the speaker is mid-sentence) to 1 (the speaker has finished)."""
        ...


def smart_turn_model_path(cache_dir: Path | None = None) -> Path:
    """The Smart Turn v3.2 ONNX file, downloaded from the Hugging Face hub on first use.

    Offline, with no copy in the cache, a ``ConfigError`` says how to get one.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ModuleNotFoundError as e:  # faster-whisper depends on it, so this is rare
        raise ConfigError(
            "the turn-end model needs huggingface_hub: pip install huggingface_hub"
        ) from e
    try:
        path = Path(
            hf_hub_download(
                SMART_TURN_REPO,
                SMART_TURN_FILE,
                revision=SMART_TURN_REVISION,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
        )
    except Exception as e:  # the hub client raises many types: offline, 404, disk full
        raise ConfigError(
            f"cannot get the turn-end model {SMART_TURN_FILE} from the Hugging Face repo "
            f"{SMART_TURN_REPO} ({type(e).__name__}). Connect once so it is cached, download "
            "it yourself and pass its path (VOICEBOT_TURN_END_MODEL), or turn the model off "
            "(VOICEBOT_TURN_END_MODEL=off)"
        ) from e
    return path


def load_turn_end_model(setting: str, cache_dir: Path | None = None) -> SmartTurn | None:
    """The model ``VOICEBOT_TURN_END_MODEL`` names: "off" (None), "smart-turn" (from the hub,
    cached) or a local .onnx path.

    The default ("smart-turn") degrades to silence timing with a warning when the model
    cannot be fetched (offline first start); a path that does not load is a ``ConfigError``.
    """
    choice = setting.strip()
    if choice.lower() in {"", "off", "none"}:
        return None
    if choice.lower() == "smart-turn":
        try:
            model = SmartTurn(smart_turn_model_path(cache_dir))
        except ConfigError as e:
            logger.warning("%s; ending turns on silence alone", e)
            return None
    else:
        model = SmartTurn(Path(choice).expanduser())
    logger.info("turn-end model %s loaded", model.name)
    return model


class SmartTurn:
    """Smart Turn v3.x on onnxruntime. One instance is shared by every call (the session is
    thread-safe); ``complete_probability`` blocks for ~50 ms, so run it off the audio path."""

    name = "smart-turn-v3.2"

    def __init__(self, model_path: Path, *, threads: int = 1, check_hash: bool = True) -> None:
        if not model_path.is_file():
            raise ConfigError(f"turn-end model not found at {model_path}")
        if check_hash and model_path.name == SMART_TURN_FILE:
            digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
            if digest != SMART_TURN_SHA256:
                raise ConfigError(
                    f"{model_path} is not the Smart Turn v3.2 model (sha256 {digest}); "
                    "delete it so it is downloaded again"
                )
        try:
            import onnxruntime
        except ModuleNotFoundError as e:
            raise ConfigError(
                "the turn-end model needs onnxruntime: pip install onnxruntime"
            ) from e
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session: Any = onnxruntime.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ConfigError(f"cannot load the turn-end model {model_path}: {e}") from e
        self._input = self._session.get_inputs()[0].name

    def complete_probability(self, audio: Samples) -> float:
        """Probability that the turn ending ``audio`` is complete (last 8 s are used)."""
        started = time.perf_counter()
        features = log_mel_features(last_window(audio))
        output = self._session.run(None, {self._input: features[np.newaxis]})
        probability = float(np.asarray(output[0]).reshape(-1)[0])
        logger.debug(
            "turn end: p(complete)=%.2f in %.0f ms",
            probability,
            1000 * (time.perf_counter() - started),
        )
        return probability


def last_window(audio: Samples) -> Samples:
    """The last 8 s of ``audio``, zero-padded at the front (the model's input)."""
    size = _WINDOW_S * SAMPLE_RATE
    samples = np.asarray(audio, dtype=np.float32)
    if samples.size >= size:
        return samples[-size:]
    return np.concatenate((np.zeros(size - samples.size, np.float32), samples))


def _mel_filters() -> np.ndarray[Any, np.dtype[np.float64]]:
    """Slaney-scale, Slaney-normalised triangular filters, (n_fft/2 + 1, 80)."""

    def to_mel(hz: np.ndarray[Any, np.dtype[np.float64]]) -> np.ndarray[Any, np.dtype[np.float64]]:
        log_region = hz >= 1000.0
        mel = 3.0 * hz / 200.0
        mel[log_region] = 15.0 + np.log(hz[log_region] / 1000.0) * (27.0 / np.log(6.4))
        return mel

    def to_hz(mel: np.ndarray[Any, np.dtype[np.float64]]) -> np.ndarray[Any, np.dtype[np.float64]]:
        log_region = mel >= 15.0
        hz = 200.0 * mel / 3.0
        hz[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel[log_region] - 15.0))
        return hz

    edges = np.array([0.0, SAMPLE_RATE / 2.0])
    low, high = to_mel(edges)
    centres = to_hz(np.linspace(low, high, _N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE // 2, _N_FFT // 2 + 1)
    slopes = centres[np.newaxis, :] - bins[:, np.newaxis]
    widths = np.diff(centres)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= (2.0 / (centres[2:] - centres[:-2]))[np.newaxis, :]
    return filters


_FILTERS = _mel_filters()
_WINDOW = np.hanning(_N_FFT + 1)[:-1]


def log_mel_features(window: Samples) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Whisper log-mel features of an 8 s window, (80, 800) float32.

    The computation of transformers' ``WhisperFeatureExtractor(chunk_length=8)`` with
    ``do_normalize=True``, which is what Smart Turn was trained on: the waveform scaled to zero
    mean and unit variance, a centred (reflect-padded) 400-point STFT every 160 samples, Slaney
    mel filters, log10 clipped 8 decades below the peak, then (x + 4) / 4.
    """
    x = np.asarray(window, dtype=np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), (_N_FFT // 2, _N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2
    mel = np.maximum(1e-10, _FILTERS.T @ power.T)
    log_spec = np.log10(mel)[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    features: np.ndarray[Any, np.dtype[np.float32]] = ((log_spec + 4.0) / 4.0).astype(np.float32)
    return features
