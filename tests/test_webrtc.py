"""A real WebRTC call: FastRTC's offer route under uvicorn, an aiortc client on loopback.

The client does what FastRTC's web client does: opens the ``text`` data channel, posts its
offer to ``/webrtc/offer``, answers ``send_input`` (here through an input hook route, the way
FastRTC's docs wire custom front ends), sends microphone audio at real-time pace (48 kHz,
20 ms frames) and plays what comes back. Real models: tiny.en, piper joe, and the LLM through
the Ollama-protocol server.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support_voice import KeywordScript, free_port, joe, say
from voicebot.app import build_runtime, build_stream
from voicebot.audio import resample
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.runtime import Runtime
from voicebot.settings import Settings

RATE = 48000
FRAME = RATE // 50
ANSWER = "Paris is the capital of France."


class Microphone:
    """An aiortc audio track: silence, then ``say()``'s samples, then silence, in real time."""

    def __init__(self) -> None:
        from aiortc import AudioStreamTrack

        outer = self

        class Track(AudioStreamTrack):
            async def recv(self) -> Any:
                return await outer._next_frame(self)

        self.track = Track()
        self._pending = np.zeros(0, np.int16)
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._sent = 0
        self.speech_end_t: float | None = None

    def say(self, samples: np.ndarray) -> None:
        with self._lock:
            self._pending = np.concatenate([self._pending, samples])

    async def _next_frame(self, track: Any) -> Any:
        import av

        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._t0 + self._sent / RATE - time.monotonic()))
        with self._lock:
            piece, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            if piece.size and not self._pending.size:
                self.speech_end_t = time.monotonic() + piece.size / RATE
        piece = np.pad(piece, (0, FRAME - piece.size))
        frame = av.AudioFrame.from_ndarray(piece.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, RATE)
        self._sent += FRAME
        return frame


class Speaker:
    """Collects the agent's audio with arrival times."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, np.ndarray]] = []

    async def play(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = frame.to_ndarray().astype(np.float32) / 32768.0
            channels = len(frame.layout.channels)
            mono = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples[0]
            self.frames.append((time.monotonic(), mono.reshape(-1)))

    def loud_since(self, t: float, threshold: float = 0.02) -> float | None:
        """Arrival time of the first loud frame at or after ``t``."""
        for at, samples in self.frames:
            if at >= t and np.max(np.abs(samples)) > threshold:
                return at
        return None

    def quiet_for(self, seconds: float) -> bool:
        """Nothing loud arrived in the last ``seconds``."""
        now = time.monotonic()
        return all(np.max(np.abs(s)) <= 0.02 for at, s in self.frames if at >= now - seconds)

    def audio_since(self, t: float) -> np.ndarray:
        parts = [s for at, s in self.frames if at >= t]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@pytest.fixture(scope="module")
def runtime(
    tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Runtime, Settings]]:
    with OllamaProtocolServer("gpu-8b", script=KeywordScript([("france", ANSWER)])) as ollama:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("data-webrtc"),
            persona="assistant-en",
            stt_model=str(tiny_en_model_dir),
            tts_voice=str(joe_voice_path),
            ollama_host=ollama.base_url,
        )
        yield build_runtime(settings, personas=["assistant-en"]), settings


@pytest.fixture(scope="module")
def server(runtime: tuple[Runtime, Settings]) -> Iterator[str]:
    import uvicorn
    from fastapi import FastAPI

    stream = build_stream(*runtime)
    app = FastAPI()
    stream.mount(app)

    @app.post("/input_hook")
    async def input_hook(body: dict[str, str]) -> dict[str, str]:
        stream.set_input(body["webrtc_id"], body["persona"], body.get("conversation", ""))
        return {"status": "ok"}

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


async def _call(base_url: str, speech: np.ndarray) -> tuple[Speaker, Microphone, list[str]]:
    from aiortc import RTCPeerConnection, RTCSessionDescription

    webrtc_id = uuid.uuid4().hex
    pc = RTCPeerConnection()  # no ICE servers: loopback host candidates only
    microphone, speaker = Microphone(), Speaker()
    messages: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    channel = pc.createDataChannel("text")
    http = httpx.AsyncClient(base_url=base_url, timeout=10)

    @channel.on("message")
    def on_message(message: str) -> None:
        messages.append(message)
        if json.loads(message).get("type") == "send_input":
            body = {"webrtc_id": webrtc_id, "persona": "assistant-en"}
            tasks.append(asyncio.ensure_future(_post(http, "/input_hook", body)))

    @pc.on("track")
    def on_track(track: Any) -> None:
        tasks.append(asyncio.ensure_future(speaker.play(track)))

    pc.addTrack(microphone.track)
    try:
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": webrtc_id}
        answer = (await http.post("/webrtc/offer", json=offer)).json()
        assert "sdp" in answer, answer  # errors come back as 200 with status: failed
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

        # A polite caller: waits for the greeting to be over, then asks.
        greeting = await _until(lambda: speaker.loud_since(0) is not None, 30)
        assert greeting, f"no greeting; messages: {messages}"
        await _until(lambda: speaker.quiet_for(0.6), 20)
        microphone.say(speech)
        await _until(lambda: microphone.speech_end_t is not None, 10)
        assert microphone.speech_end_t is not None
        end = microphone.speech_end_t
        await _until(lambda: speaker.loud_since(end) is not None, 30)
        await _until(lambda: speaker.quiet_for(0.8), 20)  # the whole answer
    finally:
        await pc.close()
        await http.aclose()
        for task in tasks:
            task.cancel()
    return speaker, microphone, messages


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, str]) -> None:
    (await http.post(path, json=body)).raise_for_status()


async def _until(predicate: Any, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


def test_a_webrtc_caller_hears_the_greeting_then_the_answer(
    server: str, runtime: tuple[Runtime, Settings], joe_voice_path: Path
) -> None:
    rate, question = say(joe(joe_voice_path), "What is the capital of France?")
    speech = (np.clip(resample(question, rate, RATE), -1, 1) * 32767).astype(np.int16)
    speaker, microphone, messages = asyncio.run(_call(server, speech))

    assert any(json.loads(m).get("type") == "send_input" for m in messages)
    assert microphone.speech_end_t is not None
    answered_at = speaker.loud_since(microphone.speech_end_t)
    assert answered_at is not None, "no reply audio after the question"
    reply = speaker.audio_since(microphone.speech_end_t)
    # What came back over the wire (Opus, 48 kHz) is the scripted answer, spoken.
    stack = runtime[0].stack("assistant-en")
    heard = stack.transcriber.transcribe((RATE, reply), "en").lower()
    assert "capital of france" in heard, heard
    delay_ms = 1000 * (answered_at - microphone.speech_end_t)
    print(f"first reply audio {delay_ms:.0f} ms after the question ended")


# --- a caller that vanishes mid-reply ----------------------------------------------------------

_VANISHING_CLIENT = r"""
import asyncio, fractions, sys, time, uuid
import av, httpx, numpy as np
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

RATE, FRAME = 48000, 960
t = np.arange(int(0.8 * RATE)) / RATE
speech = np.concatenate([np.zeros(RATE), 0.4 * np.sin(2 * np.pi * 300 * t), np.zeros(RATE * 120)])
pcm = (speech * 32767).astype(np.int16)


class Microphone(AudioStreamTrack):
    sent = 0
    t0 = None

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self.t0 + self.sent / RATE - time.monotonic()))
        frame = av.AudioFrame.from_ndarray(
            pcm[self.sent : self.sent + FRAME].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = RATE, self.sent
        frame.time_base = fractions.Fraction(1, RATE)
        self.sent += FRAME
        return frame


async def main(url):
    pc, microphone, loud = RTCPeerConnection(), Microphone(), [0]
    pc.createDataChannel("text")

    @pc.on("track")
    def on_track(track):
        async def play():
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                if microphone.sent > 1.9 * RATE and np.abs(frame.to_ndarray()).max() > 600:
                    loud[0] += 1

        asyncio.ensure_future(play())

    pc.addTrack(microphone)
    await pc.setLocalDescription(await pc.createOffer())
    offer = {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": uuid.uuid4().hex}
    async with httpx.AsyncClient(timeout=10) as http:
        answer = (await http.post(url, json=offer)).json()
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    while loud[0] < 50:  # a second of the reply
        await asyncio.sleep(0.02)
    print("mid-reply", flush=True)
    await asyncio.sleep(600)


asyncio.run(main(sys.argv[1]))
"""


def test_a_webrtc_caller_vanishing_mid_reply_ends_the_call_once_with_the_turn(
    tmp_path: Path,
) -> None:
    """The client process is killed (no close, no BYE): FastRTC notices when ICE consent
    expires (~30 s), and the call's end runs once with the turn in flight recorded."""
    import subprocess
    import sys

    from tests.support_served import LiveServer, backend_of
    from tests.test_telephony import (
        CountingStore,
        assert_ended_once_with_the_turn,
        long_reply_runtime,
    )
    from voicebot.server import create_app

    store = CountingStore()
    # a minute of speech: still playing (to no one) when ICE consent runs out
    reply = " ".join(f"Sentence number {i} is here." for i in range(1, 230))
    settings = Settings(data_dir=tmp_path, concurrency_limit=1, time_limit_s=120)
    app = create_app(settings, backend=backend_of(long_reply_runtime(store, reply)))
    with LiveServer(app) as live:
        client = subprocess.Popen(
            [sys.executable, "-c", _VANISHING_CLIENT, f"{live.http}/webrtc/offer"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None
            line = client.stdout.readline()  # blocks until mid-reply (or the client dies)
            assert line.strip() == "mid-reply", "the client heard no reply"
        finally:
            client.kill()
            client.wait(10)
        deadline = time.monotonic() + 60
        while store.closes == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert_ended_once_with_the_turn(store, reply)
