"""Helpers for the real-parts tests: spoken test audio, a keyword-driven LLM script, ports."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voicebot.audio import MonoAudio
from voicebot.ollama_server import Script
from voicebot.tts import PiperSynthesizer

_voices: dict[Path, PiperSynthesizer] = {}
_voices_lock = threading.Lock()


def joe(voice_path: Path) -> PiperSynthesizer:
    """The joe piper voice, loaded once per test session."""
    with _voices_lock:
        if voice_path not in _voices:
            _voices[voice_path] = PiperSynthesizer(str(voice_path), voices_dir=voice_path.parent)
        return _voices[voice_path]


_exact_voices: dict[Path, Any] = {}


def say_exactly(voice_path: Path, text: str) -> MonoAudio:
    """``text`` in a piper voice without its sampling noise: the same audio every run (with
    the noise, a rare rendition can sound finished, or be heard otherwise, where the usual
    one is not). The voice is loaded once per test session."""
    from piper import PiperVoice, SynthesisConfig

    with _voices_lock:
        if voice_path not in _exact_voices:
            _exact_voices[voice_path] = PiperVoice.load(voice_path)
        voice = _exact_voices[voice_path]
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    chunks = list(voice.synthesize(text, syn_config=quiet))
    assert chunks, f"nothing synthesized for {text!r}"
    samples = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    return chunks[0].sample_rate, samples


def say(synthesizer: Any, text: str) -> MonoAudio:
    """``text`` spoken by ``synthesizer`` (any ``Synthesizer``) as one clip."""
    pieces = list(synthesizer.synthesize(text))
    assert pieces, f"nothing synthesized for {text!r}"
    rate = pieces[0][0]
    return rate, np.concatenate([samples for _, samples in pieces]).astype(np.float32)


class Timeline:
    """Builds a caller's recording: clips and silences, remembering where each clip ends."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._parts: list[np.ndarray] = []
        self._length = 0
        self.ends_s: list[float] = []
        """End of each clip, in seconds from the start."""
        self.starts_s: list[float] = []

    def silence(self, seconds: float) -> Timeline:
        return self._add(np.zeros(round(seconds * self.rate), np.float32))

    def clip(self, audio: MonoAudio) -> Timeline:
        rate, samples = audio
        assert rate == self.rate, "resample before adding"
        self.starts_s.append(self._length / self.rate)
        self._add(samples)
        self.ends_s.append(self._length / self.rate)
        return self

    def _add(self, samples: np.ndarray) -> Timeline:
        self._parts.append(samples)
        self._length += samples.size
        return self

    @property
    def audio(self) -> MonoAudio:
        return self.rate, np.concatenate(self._parts).astype(np.float32)


class KeywordScript(Script):
    """Replies chosen by a keyword in the last user message (robust to extra requests)."""

    def __init__(self, rules: Sequence[tuple[str, str]], default: str = "Okay.") -> None:
        super().__init__()
        self.rules = list(rules)
        self.default = default

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> str:
        last = next(
            (str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"),
            "",
        ).lower()
        for keyword, text in self.rules:
            if keyword.lower() in last:
                return text
        return self.default


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def voicebot_command() -> list[str]:
    """The ``voicebot`` console script of the running interpreter."""
    return [sys.executable, "-m", "voicebot.cli"]


def subprocess_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """An environment for a ``voicebot`` subprocess: offline, a private data dir."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("VOICEBOT_") and k != "OLLAMA_HOST"
    }
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        VOICEBOT_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def rms_db(samples: np.ndarray) -> float:
    """Loudness in dBFS (very negative for silence)."""
    return float(20 * np.log10(np.sqrt(np.mean(np.square(samples, dtype=np.float64))) + 1e-9))
