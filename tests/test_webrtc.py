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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support_voice import KeywordScript, free_port, joe, say
from voicebot.app import build_runtime, build_stream
from voicebot.audio import resample, to_int16
from voicebot.bench.rtc_client import FRAME, RATE, RtcCaller, RtcTrace, first_onset, until
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.runtime import Runtime
from voicebot.settings import Settings

ANSWER = "Paris is the capital of France."


# A raw aiortc microphone and speaker (test_haproxy's caller is built on them; the calls here use
# the package's RtcCaller).


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


async def _call(base_url: str, speech: np.ndarray) -> tuple[RtcTrace, int]:
    """A polite caller: waits for the greeting to be over, then asks, and hears the answer;
    returns what it sent and heard, and the microphone sample the question starts at."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:

        async def send_inputs(webrtc_id: str) -> None:
            body = {"webrtc_id": webrtc_id, "persona": "assistant-en"}
            (await http.post("/input_hook", json=body)).raise_for_status()

        async with RtcCaller(base_url, input_hook=send_inputs) as caller:
            greeting = await until(lambda: caller.loud_since(0) is not None, 30)
            assert greeting, f"no greeting; messages: {caller.trace.messages}"
            await until(lambda: caller.quiet_for(0.6), 20)
            start = caller.say(speech)
            trace = caller.trace
            await until(lambda: trace.sent_at(start + speech.size - 1) is not None, 10)
            end = trace.sent_at(start + speech.size - 1)
            assert end is not None
            await until(lambda: caller.loud_since(end) is not None, 30)
            await until(lambda: caller.quiet_for(0.8), 20)  # the whole answer
    return trace, start


def test_a_webrtc_caller_hears_the_greeting_then_the_answer(
    server: str, runtime: tuple[Runtime, Settings], joe_voice_path: Path
) -> None:
    rate, question = say(joe(joe_voice_path), "What is the capital of France?")
    speech = to_int16(resample(question, rate, RATE))
    trace, start = asyncio.run(_call(server, speech))

    assert any(json.loads(m).get("type") == "send_input" for m in trace.messages)
    speech_end_t = trace.sent_at(start + speech.size - 1)
    assert speech_end_t is not None
    answered = first_onset(trace.heard, speech_end_t)
    assert answered is not None, "no reply audio after the question"
    reply = np.concatenate([f.samples for f in trace.heard if f.at >= speech_end_t])
    # What came back over the wire (Opus, 48 kHz) is the scripted answer, spoken.
    stack = runtime[0].stack("assistant-en")
    heard = stack.transcriber.transcribe((RATE, reply), "en").lower()
    assert "capital of france" in heard, heard
    delay_ms = 1000 * (answered.at - speech_end_t)
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client process is killed (no close, no BYE): FastRTC notices when ICE consent
    expires (30 s by default; ~5 s here, two checks 2 s apart), and the call's end runs once
    with the turn in flight recorded."""
    import subprocess
    import sys

    from tests.support_served import LiveServer, backend_of
    from tests.test_telephony import (
        CountingStore,
        assert_ended_once_with_the_turn,
        long_reply_runtime,
    )
    from voicebot.server import create_app

    monkeypatch.setattr("aioice.ice.CONSENT_INTERVAL", 2)
    monkeypatch.setattr("aioice.ice.CONSENT_FAILURES", 2)
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


def test_the_webrtc_bench_times_a_call_to_the_served_app(
    runtime: tuple[Runtime, Settings], joe_voice_path: Path
) -> None:
    """``voicebot bench --transport webrtc`` on one item: ``create_app`` under uvicorn, a real
    WebRTC call, and every piece of the caller's wait measured, adding up to what it heard."""
    from dataclasses import replace

    from voicebot.bench.corpus import CorpusItem
    from voicebot.bench.runner import LanguageSetup
    from voicebot.bench.webrtc import run_webrtc

    base, _ = runtime
    stack = base.stack("assistant-en")
    brief = replace(stack, persona=stack.persona.model_copy(update={"greeting": "Hi."}))
    setup = LanguageSetup(
        "en", replace(base, stacks={**base.stacks, "assistant-en": brief}), "assistant-en"
    )
    rate, question = say(joe(joe_voice_path), "What is the capital of France?")
    pad = np.zeros(8000, np.float32)
    audio = np.concatenate([pad, resample(question, rate, 16000), pad, pad])
    item = CorpusItem("france", "What is the capital of France?", "en", audio)

    [m] = run_webrtc(setup, [item], repeats=1, variants={"shipped": {}}, simulate=False)

    heard = m.webrtc["shipped"]
    assert not heard.notes, heard.notes
    assert heard.heard_ms is not None and heard.own_v2v_ms is not None
    pieces = [
        heard.input_ms,
        heard.pipeline_ms,
        heard.output_ms,
        heard.client_buffer_ms,
        heard.quiet_start_ms,
    ]
    assert all(p is not None for p in pieces), heard
    assert sum(p for p in pieces if p is not None) == pytest.approx(heard.heard_ms, abs=1.0)
    # aiortc's own input jitter buffer would hold each packet until 4 more had come (>= 80 ms
    # at the caller's real-time pace, plus Opus's 6.5 ms); the served app passes them on.
    assert heard.input_ms is not None and heard.input_ms < 86, heard
