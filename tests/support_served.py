"""Clients and fakes for the serving tests: the app under uvicorn on loopback, a runtime of
fakes, a recording turn store, FastRTC's websocket protocol, an aiortc caller that can
vanish, and thread counting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from tests import fakes
from tests.support_voice import free_port
from voicebot.conversation import Conversation, Turn
from voicebot.runtime import PersonaStack, Runtime
from voicebot.server import Backend
from voicebot.telephony import ulaw_decode, ulaw_encode
from voicebot.turns import TurnConfig

WS_RATE = 16000  # FastRTC's websocket passes frames at the handler's input rate, μ-law
RTC_RATE = 48000


class RecordingStore:
    """A TurnStore that remembers what was opened, recorded and closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened: list[uuid.UUID] = []
        self.closed: list[uuid.UUID] = []
        self.turns: list[Turn] = []

    def open_conversation(self, conversation: Conversation) -> None:
        with self._lock:
            self.opened.append(conversation.conversation_id)

    def record(self, turn: Turn) -> None:
        with self._lock:
            self.turns.append(turn)

    def close_conversation(self, conversation_id: uuid.UUID, ended_at: datetime) -> None:
        with self._lock:
            self.closed.append(conversation_id)

    def recent_turns(self, conversation_id: uuid.UUID, limit: int) -> list[Turn]:
        return []

    def unclosed(self) -> set[uuid.UUID]:
        with self._lock:
            return set(self.opened) - set(self.closed)


def served_runtime(store: RecordingStore | None = None, **persona_overrides: Any) -> Runtime:
    """Fakes at every seam (tones are speech), a persona with busy and goodbye lines."""
    p = fakes.persona(
        "en",
        busy_message="All lines are busy, please call back later.",
        goodbye="Time is up, goodbye.",
        **persona_overrides,
    )
    stack = PersonaStack(
        persona=p,
        transcriber=fakes.FakeTranscriber(),
        chat=fakes.FakeChat(reply="Sure. Here is a short answer."),
        synthesizer=fakes.ToneSynthesizer(per_char_s=0.01),
    )
    return Runtime(
        vad=fakes.EnergyVad(),
        stacks={p.name: stack},
        turn_config=TurnConfig(),
        default_persona=p.name,
        store=store,  # type: ignore[arg-type]
    )


class LiveServer:
    """The app under uvicorn on a loopback port, in a thread (lifespan included)."""

    def __init__(
        self,
        app: Any,
        *,
        startup_timeout_s: float = 120.0,
        log_level: str = "warning",
        root_path: str = "",
    ) -> None:
        self.port = free_port()
        self.app = app
        # log_config=None: uvicorn's records reach the root logger (and pytest's caplog)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level=log_level,
            log_config=None,
            ws="websockets-sansio",
            root_path=root_path,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._timeout = startup_timeout_s

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)


@contextlib.contextmanager
def fake_backend(runtime: Runtime, dsn: str | None = None) -> Iterator[Backend]:
    yield Backend(runtime, dsn)


def backend_of(runtime: Runtime, dsn: str | None = None) -> Any:
    return lambda settings: fake_backend(runtime, dsn)


POOL_THREAD_PREFIXES = ("asyncio_", "AnyIO worker thread", "ThreadPoolExecutor")


def thread_count() -> int:
    """Threads that are not idle pool workers (those are bounded by their pools and reused)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith(POOL_THREAD_PREFIXES))


def thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


async def until(predicate: Callable[[], bool], within_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step_s)
    return bool(predicate())


def wait_until(predicate: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# --- FastRTC's websocket protocol ---------------------------------------------------------------


@dataclass
class SocketHeard:
    audio: list[np.ndarray] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def loud_since(self, t: float, threshold: float = 0.05) -> bool:
        return any(
            at >= t and float(np.max(np.abs(a))) > threshold
            for at, a in zip(self.arrivals, self.audio, strict=True)
            if a.size
        )


class FastRTCSocket:
    """A client of ``/websocket/offer``: ``start``, 20 ms μ-law media frames, ``stop``."""

    def __init__(self, url: str, *, websocket_id: str | None = None) -> None:
        self.url = url
        self.websocket_id = websocket_id or uuid.uuid4().hex
        self.heard = SocketHeard()
        self.ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> FastRTCSocket:
        self.ws = await connect(self.url, max_size=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def start(self, websocket_id: str | None = None) -> None:
        await self.send({"event": "start", "websocket_id": websocket_id or self.websocket_id})

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(data)

    async def speak(self, samples: np.ndarray, *, pace: bool = True) -> None:
        """Float32 16 kHz audio as 20 ms media frames (at real-time pace unless ``pace=False``)."""
        t0 = time.monotonic()
        step = WS_RATE // 50
        for i, start in enumerate(range(0, samples.size, step)):
            frame = samples[start : start + step]
            frame = np.pad(frame, (0, step - frame.size))
            pcm = (np.clip(frame, -1, 1) * 32767).astype(np.int16)
            import base64

            payload = base64.b64encode(ulaw_encode(pcm)).decode()
            await self.send({"event": "media", "media": {"payload": payload}})
            delay = t0 + (i + 1) * 0.02 - time.monotonic()
            if pace and delay > 0:
                await asyncio.sleep(delay)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.send({"event": "stop"})

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def vanish(self) -> None:
        """Drop the TCP connection without a close frame, as a killed client does."""
        assert self.ws is not None
        self.ws.transport.abort()

    async def _read(self) -> None:
        import base64

        assert self.ws is not None
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if message.get("event") == "media":
                    pcm = ulaw_decode(base64.b64decode(message["media"]["payload"]))
                    self.heard.audio.append(pcm.astype(np.float32) / 32768.0)
                    self.heard.arrivals.append(time.monotonic())
                else:
                    self.heard.messages.append(message)
        except Exception:
            pass
        finally:
            self.heard.closed.set()


# --- an aiortc caller ---------------------------------------------------------------------------


class RtcCaller:
    """An aiortc client of ``/webrtc/offer``: a microphone track, a speaker, the text channel."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        from aiortc import AudioStreamTrack, RTCPeerConnection

        outer = self
        self.base_url = base_url
        self.headers = headers or {}
        self.webrtc_id = uuid.uuid4().hex
        self.pc = RTCPeerConnection()
        self._pending = np.zeros(0, np.int16)
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._sent = 0
        self.frames: list[tuple[float, float]] = []  # (arrival, peak)
        self.tasks: list[asyncio.Future[Any]] = []
        self.speech_end_t: float | None = None
        self.messages: list[dict[str, Any]] = []  # what the server sent on the text channel
        self.on_message: Callable[[dict[str, Any]], None] | None = None

        class Microphone(AudioStreamTrack):
            async def recv(self) -> Any:
                return await outer._next_frame()

        channel = self.pc.createDataChannel("text")
        self.pc.addTrack(Microphone())

        @channel.on("message")  # type: ignore[misc]
        def _on_message(raw: str) -> None:
            message = json.loads(raw)
            self.messages.append(message)
            if self.on_message is not None:
                self.on_message(message)

        @self.pc.on("track")  # type: ignore[misc]
        def _on_track(track: Any) -> None:
            self.tasks.append(asyncio.ensure_future(self._play(track)))

    def say(self, samples_16k: np.ndarray) -> None:
        from voicebot.audio import resample

        up = resample(samples_16k.astype(np.float32), WS_RATE, RTC_RATE)
        with self._lock:
            self._pending = np.concatenate(
                [self._pending, (np.clip(up, -1, 1) * 32767).astype(np.int16)]
            )

    async def _next_frame(self) -> Any:
        import fractions

        import av

        step = RTC_RATE // 50
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._t0 + self._sent / RTC_RATE - time.monotonic()))
        with self._lock:
            piece, self._pending = self._pending[:step], self._pending[step:]
            if piece.size and not self._pending.size:
                self.speech_end_t = time.monotonic() + piece.size / RTC_RATE
        piece = np.pad(piece, (0, step - piece.size))
        frame = av.AudioFrame.from_ndarray(piece.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RTC_RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, RTC_RATE)
        self._sent += step
        return frame

    async def _play(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            peak = float(np.max(np.abs(frame.to_ndarray()))) / 32768.0
            self.frames.append((time.monotonic(), peak))

    def loud_since(self, t: float, threshold: float = 0.05) -> bool:
        return any(at >= t and peak > threshold for at, peak in self.frames)

    async def connect(self, post: Callable[[dict[str, Any]], Awaitable[Any]]) -> dict[str, Any]:
        """Offer, and apply the answer when there is one; returns the server's JSON reply."""
        from aiortc import RTCSessionDescription

        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer", "webrtc_id": self.webrtc_id}
        reply: dict[str, Any] = await post(offer)
        if "sdp" in reply:
            await self.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], reply["type"]))
        return reply

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()


def wait_until_ready(base: str, server: subprocess.Popen[Any], within_s: float) -> bool:
    """Wait for a ``voicebot serve`` subprocess to answer ``/readyz`` with 200; False if it
    exits or takes longer than ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return True
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
