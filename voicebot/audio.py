"""Audio values and conversions.

Audio is always ``(sample_rate, samples)``, the FastRTC convention. Inside the pipeline
samples are mono float32 in [-1, 1]; at the edges we accept int16 or float32, mono or
stereo, channels first or last, at any sample rate.
"""

from __future__ import annotations

from math import ceil, gcd
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

Samples: TypeAlias = npt.NDArray[np.float32]
Audio: TypeAlias = tuple[int, npt.NDArray[Any]]
"""``(sample_rate, samples)``: int16 or float32, shaped (n,), (channels, n) or (n, channels)."""

MonoAudio: TypeAlias = tuple[int, Samples]
"""``(sample_rate, samples)`` with samples mono float32 in [-1, 1]."""


def to_mono_float32(audio: Audio) -> MonoAudio:
    """Return mono float32 samples in [-1, 1]; NaN becomes 0 and anything else is clipped.

    Raises ``ValueError`` for a non-positive sample rate or an array with more than two axes.
    """
    rate, samples = audio
    if int(rate) <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    array = np.asarray(samples)
    if array.ndim > 2:
        raise ValueError(f"audio must have at most 2 axes, got shape {array.shape}")
    if array.ndim == 2:
        # The channel axis is the short one: (channels, n) from FastRTC, (n, channels) from files.
        channel_axis = 0 if array.shape[0] <= array.shape[1] else 1
        array = (
            array.mean(axis=channel_axis) if array.shape[channel_axis] > 1 else array.reshape(-1)
        )
    if array.dtype == np.int16:
        mono = array.astype(np.float32) / 32768.0
    elif np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        mono = array.astype(np.float32) / float(max(abs(info.min), info.max))
    else:
        mono = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(mono)):
        mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
    return int(rate), np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def resample(samples: Samples, from_rate: int, to_rate: int) -> Samples:
    """Resample mono float32 samples with a polyphase filter (no-op when the rates match)."""
    if from_rate == to_rate or samples.size == 0:
        return samples
    from scipy.signal import resample_poly

    divisor = gcd(int(from_rate), int(to_rate))
    out = resample_poly(samples, to_rate // divisor, from_rate // divisor)
    return np.asarray(out, dtype=np.float32)


class StreamResampler:
    """One stream's consecutive frames from one rate to another, each frame as it comes.

    The output is what resampling the whole stream at once gives (``resample``), delayed by
    ``lag`` input samples: the polyphase filter's half-length (0.6-1.4 ms at the rates we
    use), not a frame. Resampling each frame on its own instead leaves a step at every frame
    edge (on speech, −30 dB of error at 8 kHz, −41 dB at 22.05 kHz). After ``n`` input
    samples in all, exactly ``floor(n * to_rate / from_rate)`` output samples have come out,
    so 20 ms frames stay 20 ms frames whenever the rates allow it.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"cannot resample {from_rate} Hz to {to_rate} Hz")
        divisor = gcd(int(from_rate), int(to_rate))
        self.from_rate = int(from_rate)
        self.to_rate = int(to_rate)
        self._up = self.to_rate // divisor
        self._down = self.from_rate // divisor
        # scipy's resample_poly filter reaches 10 * max(up, down) samples of the upsampled
        # stream either side of an output: this many input samples.
        self.lag = (
            0 if self._up == self._down else ceil(10 * max(self._up, self._down) / self._up) + 1
        )
        self._pending = np.zeros(self.lag, np.float32)  # the lag, as leading silence
        self._base = 0  # stream index of _pending[0]; always a multiple of _down
        self._emitted = 0  # output samples handed out so far

    def __call__(self, samples: Samples) -> Samples:
        samples = np.asarray(samples, np.float32)
        if self._up == self._down:
            return samples
        from scipy.signal import resample_poly

        up, down = self._up, self._down
        self._pending = np.concatenate((self._pending, samples))
        heard = self._base + self._pending.size
        ready = (heard - self.lag) * up // down  # outputs whose filter has all its input
        if ready <= self._emitted:
            return np.zeros(0, np.float32)
        offset = self._base * up // down
        out = resample_poly(self._pending, up, down)[self._emitted - offset : ready - offset]
        self._emitted = ready
        # Keep what the next outputs' filters still reach, from a multiple of ``down`` so
        # that output indices of the kept part stay whole numbers.
        keep_from = max(0, ready * down // up - self.lag) // down * down
        if keep_from > self._base:
            self._pending = self._pending[keep_from - self._base :]
            self._base = keep_from
        return np.asarray(out, np.float32)


def to_int16(samples: Samples) -> npt.NDArray[np.int16]:
    """Convert float32 samples in [-1, 1] to int16 PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def duration_s(audio: MonoAudio) -> float:
    """Length of the audio in seconds."""
    rate, samples = audio
    return float(samples.shape[-1]) / float(rate)
