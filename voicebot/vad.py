"""Voice activity detection: Silero v6 on onnxruntime, no torch.

One ``SileroVad`` holds one onnxruntime session for the whole process; each call gets its
own ``VadStream`` carrying the recurrent state and the 64-sample context, so concurrent
calls never share state. onnxruntime sessions may be run from several threads at once.

Two exports of the v6 model exist and both are accepted:

- the official one (``silero_vad/data/silero_vad.onnx``): inputs ``input`` (1, 64 + 512),
  ``state`` (2, 1, 128), ``sr`` (int64 scalar); outputs ``output``, ``stateN``;
- faster-whisper's (``faster_whisper/assets/silero_vad_v6.onnx``, our default): inputs
  ``input`` (1, 64 + 512), ``h`` and ``c`` (1, 1, 128), no ``sr`` (16 kHz only); outputs
  ``speech_probs``, ``hn``, ``cn``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from voicebot.audio import Samples
from voicebot.errors import ConfigError

logger = logging.getLogger(__name__)

WINDOW_SAMPLES = 512
"""Samples per VAD window: 32 ms at 16 kHz."""
VAD_SAMPLE_RATE = 16000
CONTEXT_SAMPLES = 64
"""Samples of the previous window that Silero v6 expects in front of each new window."""
_STATE_SHAPE = (2, 1, 128)
_LSTM_SHAPE = (1, 1, 128)


class VadStream(Protocol):
    """Speech probabilities for consecutive windows of one audio stream."""

    def probability(self, window: Samples) -> float:
        """Speech probability 0..1 of exactly ``WINDOW_SAMPLES`` float32 samples at 16 kHz."""
        ...


class VoiceActivityModel(Protocol):
    """A VAD model shared by all calls; ``stream()`` gives each call its own state."""

    def stream(self) -> VadStream:
        """Return a fresh stream with zeroed recurrent state and context."""
        ...


def default_silero_path() -> Path:
    """Path of the Silero v6 ONNX model shipped inside the faster-whisper wheel."""
    # find_spec locates the package without importing faster_whisper (and ctranslate2).
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the default Silero VAD model ships with faster-whisper: pip install faster-whisper"
        )
    return Path(spec.origin).parent / "assets" / "silero_vad_v6.onnx"


def _check_window(window: Samples) -> np.ndarray[Any, np.dtype[np.float32]]:
    array = np.asarray(window, dtype=np.float32)
    if array.ndim != 1 or array.shape[0] != WINDOW_SAMPLES:
        raise ValueError(
            f"VAD window must be exactly {WINDOW_SAMPLES} mono samples at {VAD_SAMPLE_RATE} Hz "
            f"(32 ms), got shape {array.shape}"
        )
    return array


class _SileroStream:
    """Per-call state over a shared session; not itself safe for concurrent use."""

    def __init__(self, session: Any, *, lstm_inputs: bool) -> None:
        self._session = session
        self._lstm_inputs = lstm_inputs
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        if lstm_inputs:
            self._h = np.zeros(_LSTM_SHAPE, dtype=np.float32)
            self._c = np.zeros(_LSTM_SHAPE, dtype=np.float32)
        else:
            self._state = np.zeros(_STATE_SHAPE, dtype=np.float32)
            self._sr = np.array(VAD_SAMPLE_RATE, dtype=np.int64)

    def probability(self, window: Samples) -> float:
        samples = _check_window(window)
        model_input = np.concatenate([self._context, samples])[np.newaxis, :]
        if self._lstm_inputs:
            prob, self._h, self._c = self._session.run(
                None, {"input": model_input, "h": self._h, "c": self._c}
            )
        else:
            prob, self._state = self._session.run(
                None, {"input": model_input, "state": self._state, "sr": self._sr}
            )
        # The next window's context is the tail of this one (as in silero-vad's OnnxWrapper).
        self._context = samples[-CONTEXT_SAMPLES:].copy()
        return float(np.asarray(prob).reshape(-1)[0])


class SileroVad:
    """Silero v6 VAD; one onnxruntime session shared by every stream."""

    def __init__(self, model_path: Path | None = None) -> None:
        path = Path(model_path) if model_path is not None else default_silero_path()
        if not path.is_file():
            raise ConfigError(
                f"Silero VAD model not found at {path}: pass the path of a Silero v6 .onnx "
                "file, or reinstall faster-whisper (it ships silero_vad_v6.onnx)"
            )
        try:
            import onnxruntime
        except ModuleNotFoundError as e:
            raise ConfigError("the Silero VAD needs onnxruntime: pip install onnxruntime") from e

        options = onnxruntime.SessionOptions()
        # One thread per run: a 32 ms window is too small to split, and concurrent calls
        # already run in parallel on this shared session.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ConfigError(f"cannot load Silero VAD model {path}: {e}") from e
        names = {i.name for i in self._session.get_inputs()}
        if {"input", "state", "sr"} <= names:
            self._lstm_inputs = False
        elif {"input", "h", "c"} <= names:
            self._lstm_inputs = True
        else:
            raise ConfigError(
                f"{path} is not a Silero v6 VAD model (inputs {sorted(names)}); expected "
                "input/state/sr or input/h/c"
            )
        self.path = path
        logger.info("Silero VAD loaded from %s", path)

    def stream(self) -> VadStream:
        """A fresh per-call stream sharing this model's session."""
        return _SileroStream(self._session, lstm_inputs=self._lstm_inputs)
