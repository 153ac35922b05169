"""A WebRTC caller with no browser: aiortc on loopback, timing what it sends and hears.

It does what FastRTC's web client does: opens the ``text`` data channel, posts its offer to
``/webrtc/offer``, sends microphone audio at real-time pace (48 kHz, 20 ms frames) and plays
what comes back. Every microphone frame's send time, every RTP packet's arrival and every
decoded frame's arrival are kept, so a latency can be split at the client's jitter buffer.

The only module that touches aiortc's receiver internals: ``_handle_rtp_packet`` is wrapped
to see packets arrive before aiortc's jitter buffer holds them (it keeps 4 packets, 80 ms,
before releasing one).
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from voicebot.audio import Samples

logger = logging.getLogger(__name__)

RATE = 48000
"""What a browser sends and what Opus carries."""
FRAME = RATE // 50
ONSET_PEAK = 0.01
"""A received frame whose peak is above this (-40 dBFS) is sound; Opus decodes digital
silence to (nearly) zeros."""
_RTP_WRAP = 1 << 32


@dataclass
class HeardFrame:
    """A decoded frame as the client's track handed it over."""

    at: float
    """``time.monotonic()`` when ``recv`` returned it."""
    pts: int
    """RTP timestamp relative to the first packet (48 kHz)."""
    samples: Samples
    """Mono float32 at 48 kHz."""


@dataclass
class RtcTrace:
    """What one caller sent and heard; times are ``time.monotonic()`` seconds."""

    sent: list[float] = field(default_factory=list)
    """When microphone frame ``i`` (samples ``i*FRAME`` onwards, 48 kHz) was handed to aiortc."""
    packets: list[tuple[float, int]] = field(default_factory=list)
    """``(arrival, RTP timestamp)`` of every received audio packet, before the jitter buffer."""
    heard: list[HeardFrame] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    """The data channel's messages, in order."""

    def sent_at(self, sample: int) -> float | None:
        """When the microphone frame holding ``sample`` was sent (None: not yet)."""
        index = max(sample, 0) // FRAME
        return self.sent[index] if index < len(self.sent) else None

    def packet_arrival(self, pts: int) -> float | None:
        """When the packet of the frame with relative timestamp ``pts`` arrived."""
        if not self.packets:
            return None
        origin = self.packets[0][1]
        for at, timestamp in self.packets:
            if (timestamp - origin) % _RTP_WRAP == pts % _RTP_WRAP:
                return at
        return None


def first_onset(
    frames: list[HeardFrame], after: float, *, peak: float = ONSET_PEAK
) -> HeardFrame | None:
    """The first frame heard at or after ``after`` that is sound rather than silence."""
    for frame in frames:
        if frame.at >= after and frame.samples.size and float(np.max(np.abs(frame.samples))) > peak:
            return frame
    return None


def frame_onset_s(samples: Samples, *, peak: float = ONSET_PEAK, rate: int = RATE) -> float:
    """Where in a frame the sound starts (seconds from its start; the frame's length if never)."""
    loud = np.flatnonzero(np.abs(samples) > peak)
    return float(loud[0] if loud.size else samples.size) / rate


class Microphone:
    """An aiortc audio track: silence, then what ``say`` was given, at real-time pace."""

    def __init__(self, trace: RtcTrace) -> None:
        from aiortc import AudioStreamTrack

        outer = self

        class Track(AudioStreamTrack):
            async def recv(self) -> Any:
                return await outer._next_frame()

        self.track = Track()
        self._trace = trace
        self._pending = np.zeros(0, np.int16)
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._frames = 0
        self._queued_at: int | None = None

    def say(self, samples: npt.NDArray[np.int16]) -> int:
        """Queue 48 kHz int16 speech after what is pending; returns the index of the
        microphone sample it starts at."""
        with self._lock:
            start = (self._frames * FRAME) + self._pending.size
            self._pending = np.concatenate([self._pending, samples])
            return start

    @property
    def pending(self) -> int:
        with self._lock:
            return int(self._pending.size)

    async def _next_frame(self) -> Any:
        import av

        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            due = self._t0 + self._frames * FRAME / RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        with self._lock:
            piece, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            index = self._frames
            self._frames += 1
        piece = np.pad(piece, (0, FRAME - piece.size))
        frame = av.AudioFrame.from_ndarray(piece.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = index * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        self._trace.sent.append(time.monotonic())
        return frame


def _mono(frame: Any) -> Samples:
    samples = frame.to_ndarray().astype(np.float32) / 32768.0
    channels = len(frame.layout.channels)
    if channels > 1:
        return np.asarray(samples.reshape(-1, channels).mean(axis=1), np.float32)
    return np.asarray(samples.reshape(-1), np.float32)


def _tap_packets(receiver: Any, trace: RtcTrace) -> None:
    """Note every RTP packet's arrival before aiortc's jitter buffer sees it."""
    handle = receiver._handle_rtp_packet

    async def tapped(packet: Any, arrival_time_ms: int) -> None:
        trace.packets.append((time.monotonic(), int(packet.timestamp)))
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = tapped


InputHook = Callable[[str], Awaitable[None]]
"""Answers the server's ``send_input`` for a connection id (a page sends its inputs)."""


class RtcCaller:
    """One WebRTC call to ``base_url`` (``async with``): connects, then ``say`` and wait."""

    def __init__(
        self,
        base_url: str,
        *,
        offer_path: str = "/webrtc/offer",
        input_hook: InputHook | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.offer_path = offer_path
        self.webrtc_id = uuid.uuid4().hex
        self.trace = RtcTrace()
        self.microphone: Microphone | None = None
        self._input_hook = input_hook
        self._pc: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RtcCaller:
        import httpx
        from aiortc import RTCPeerConnection, RTCSessionDescription

        pc = self._pc = RTCPeerConnection()  # no ICE servers: loopback host candidates only
        self.microphone = Microphone(self.trace)
        channel = pc.createDataChannel("text")

        @channel.on("message")
        def on_message(message: str) -> None:
            self.trace.messages.append(message)
            if self._input_hook is not None and _kind(message) == "send_input":
                self._tasks.append(asyncio.ensure_future(self._input_hook(self.webrtc_id)))

        @pc.on("track")
        def on_track(track: Any) -> None:
            self._tasks.append(asyncio.ensure_future(self._listen(track)))

        pc.addTrack(self.microphone.track)
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio":
                _tap_packets(transceiver.receiver, self.trace)
        try:
            await pc.setLocalDescription(await pc.createOffer())
            offer = {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": self.webrtc_id}
            async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as http:
                response = await http.post(self.offer_path, json=offer)
            answer = response.json()
            if not isinstance(answer, dict) or "sdp" not in answer:
                raise ConnectionError(f"the server refused the offer: {answer}")
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pc is not None:
            await self._pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.trace.heard.append(HeardFrame(time.monotonic(), int(frame.pts), _mono(frame)))

    def say(self, samples: npt.NDArray[np.int16]) -> int:
        """Queue 48 kHz int16 speech; returns the microphone sample it starts at."""
        assert self.microphone is not None, "use the caller in `async with`"
        return self.microphone.say(samples)

    def loud_since(self, t: float) -> float | None:
        """Arrival of the first sound heard at or after ``t``."""
        frame = first_onset(self.trace.heard, t)
        return None if frame is None else frame.at

    def quiet_for(self, seconds: float) -> bool:
        """Frames keep coming or not, nothing loud was heard in the last ``seconds``."""
        since = time.monotonic() - seconds
        return first_onset(self.trace.heard, since) is None


def _kind(message: str) -> str | None:
    try:
        value = json.loads(message)
    except ValueError:
        return None
    return value.get("type") if isinstance(value, dict) else None


async def until(predicate: Callable[[], bool], within_s: float, poll_s: float = 0.02) -> bool:
    """Wait until ``predicate()`` holds, at most ``within_s``; whether it did."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(poll_s)
    return bool(predicate())
