"""Line accounting under careless and hostile clients: bad offers, odd websockets, vanishing and
stalling callers, churn. Each test ends with no line held, FastRTC's maps and ours empty, and
every conversation that was opened ended.

Fakes at the model seams (tones are speech), the real server under uvicorn, real clients
(aiortc, websockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from tests.fakes import silence, tone
from tests.support_served import (
    FastRTCSocket,
    LiveServer,
    RecordingStore,
    RtcCaller,
    backend_of,
    served_runtime,
    thread_count,
    thread_names,
    until,
    wait_until,
)
from tests.test_telephony import TwilioClient
from voicebot.server import VoiceService, mount
from voicebot.server.rtc_signalling import open_entries
from voicebot.settings import Settings

LIMIT = 2


class Served:
    """A live app with one service, its recording store and URLs."""

    def __init__(self, live: LiveServer, service: VoiceService, store: RecordingStore) -> None:
        self.live = live
        self.service = service
        self.store = store

    @property
    def http(self) -> str:
        return self.live.http

    @property
    def ws(self) -> str:
        return self.live.ws

    def idle(self) -> bool:
        """No line held, no call running, FastRTC's maps empty, every conversation ended."""
        return (
            self.service.free_lines() == self.service.limit
            and self.service.calls_in_progress() == 0
            and not any(open_entries(self.service.stream).values())
            and not self.store.unclosed()
        )

    def state(self) -> dict[str, Any]:
        return {
            "free": self.service.free_lines(),
            "calls": self.service.calls_in_progress(),
            "maps": open_entries(self.service.stream),
            "unclosed": len(self.store.unclosed()),
        }


@contextlib.contextmanager
def served(tmp_path: Path, *, ui: bool = False, **settings: Any) -> Iterator[Served]:
    from fastapi import FastAPI

    store = RecordingStore()
    options: dict[str, Any] = {"data_dir": tmp_path, "concurrency_limit": LIMIT}
    options.update(settings)
    app = FastAPI()
    backend = backend_of(served_runtime(store))
    service = mount(app, "", settings=Settings(**options), backend=backend, ui=ui)
    with LiveServer(app) as live:
        yield Served(live, service, store)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One served app for the tests that need no special settings (building FastRTC's stream
    and page is the slow part); each test leaves it idle."""
    with served(tmp_path_factory.mktemp("lines"), ui=True) as s:
        yield s


async def _post_offer(http: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await http.post("/webrtc/offer", json=body)


async def _real_call(s: Served) -> None:
    """An aiortc call that is admitted, hears the greeting, asks, hears a reply, hangs up."""
    caller = RtcCaller(s.http)
    async with httpx.AsyncClient(base_url=s.http, timeout=20) as http:

        async def post(offer: dict[str, Any]) -> Any:
            return (await http.post("/webrtc/offer", json=offer)).json()

        reply = await caller.connect(post)
        assert "sdp" in reply, reply
        assert await until(lambda: caller.loud_since(0), 20), "no greeting"
        await asyncio.sleep(0.8)
        caller.say(np.concatenate([tone(0.8), silence(1.2)]))
        asked = time.monotonic()
        assert await until(lambda: caller.loud_since(asked + 0.8), 20), "no reply"
    await caller.close()


def _valid_sdp() -> str:
    async def make() -> str:
        from aiortc import AudioStreamTrack, RTCPeerConnection

        pc = RTCPeerConnection()
        pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        sdp: str = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


# --- signalling fuzz --------------------------------------------------------------------------


def test_bad_offers_and_odd_websockets_hold_no_line(shared: Served) -> None:
    sdp = _valid_sdp()
    no_ufrag = "\n".join(line for line in sdp.splitlines() if "ice-ufrag" not in line)
    bad_bodies: list[dict[str, Any]] = [
        {"sdp": None, "type": "offer", "webrtc_id": "null-1"},
        {"sdp": None, "type": "offer", "webrtc_id": "null-2"},
        {"sdp": "garbage", "type": "offer", "webrtc_id": "garbage"},
        {"sdp": "v=0\r\nm=audio 9 X\r\na=ice-ufrag:x\r\n", "type": "offer", "webrtc_id": "half"},
        {"sdp": no_ufrag, "type": "offer", "webrtc_id": "no-ufrag"},
        {"sdp": sdp, "type": "answer", "webrtc_id": "answer"},
        {"sdp": sdp, "type": "pranswer", "webrtc_id": "pranswer"},
        {"sdp": sdp, "type": "rollback", "webrtc_id": "rollback"},
        {"sdp": sdp, "type": "", "webrtc_id": "empty-type"},
        {"type": "ice-candidate", "webrtc_id": "no-candidate"},
        {"type": "ice-candidate", "candidate": {"candidate": "junk"}, "webrtc_id": "unknown"},
        {"sdp": sdp, "type": "offer", "webrtc_id": ""},
    ]
    assert len(bad_bodies) >= 3 * LIMIT
    s = shared

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=s.http, timeout=20) as http:
            for body in bad_bodies:
                reply = await _post_offer(http, body)
                assert reply.status_code in (400, 404, 422), (body, reply.text)
                assert s.service.free_lines() == LIMIT, (body, s.state())
            # the same id twice: the second is refused, the first still connects
            first = RtcCaller(s.http)

            async def post_twice(offer: dict[str, Any]) -> Any:
                reply = (await _post_offer(http, offer)).json()
                again = await _post_offer(http, offer)
                assert again.status_code == 409, again.text
                return reply

            assert "sdp" in await first.connect(post_twice)
            assert await until(lambda: first.pc.connectionState == "connected", 10)
            assert s.service.free_lines() == LIMIT - 1
            await first.close()

        # websockets: 0, 1 and 3 starts; some aborted, some polite
        for starts, ending in ((0, "close"), (1, "abort"), (3, "stop"), (1, "close")):
            client = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
            for i in range(starts):
                await client.start(f"{client.websocket_id}-{i}")
            if starts:
                await client.speak(tone(0.2), pace=False)
            await asyncio.sleep(0.3)
            if ending == "abort":
                client.vanish()
            elif ending == "stop":
                await client.stop()
            await client.close()

        assert await until(s.idle, 15), s.state()
        await _real_call(s)

    asyncio.run(asyncio.wait_for(scenario(), 120))
    assert wait_until(s.idle, 15), s.state()
    assert s.store.opened, "the real call opened a conversation"


def test_bad_json_on_the_websocket_is_skipped_and_logged_once(
    shared: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = shared

    async def scenario() -> None:
        client = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
        await client.start()
        await client.send_raw("{not json")
        await client.send_raw("[1, 2]")
        await client.send({"event": "media", "media": {"payload": "%%%not base64"}})
        await client.send({"no": "event"})
        await client.send_raw(b"\x00\x01binary")
        await client.send({"event": "ping"})
        assert await until(lambda: {"event": "pong"} in client.heard.messages, 5)
        asked = time.monotonic()
        await client.speak(np.concatenate([tone(0.8), silence(1.5)]))
        assert await until(lambda: client.heard.loud_since(asked + 0.8), 15), "no reply"
        assert not client.heard.closed.is_set()
        await client.stop()
        await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert wait_until(s.idle, 10), s.state()
    skipped = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in skipped]
    assert any("5 bad messages skipped" in r.getMessage() for r in caplog.records)


# --- one limit for every channel --------------------------------------------------------------


def test_every_channel_shares_one_limit_counted_from_connect(shared: Served) -> None:
    sdp = _valid_sdp()
    s = shared

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=s.http, timeout=20) as http:
            # A websocket holds its line from connect, before any start.
            quiet = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
            assert await until(lambda: s.service.free_lines() == LIMIT - 1, 5), s.state()
            phone = TwilioClient(f"{s.ws}/telephone/handler")
            async with phone:
                assert await phone.wait_for(lambda: phone.heard.media_frames > 0, 10)
                assert s.service.free_lines() == 0
                opened = len(s.store.opened)
                # Full: a WebRTC offer, a websocket and a phone call are all refused.
                busy = await _post_offer(http, {"sdp": sdp, "type": "offer", "webrtc_id": "x"})
                assert busy.status_code == 503
                assert busy.json()["meta"]["error"] == "concurrency_limit_reached"
                async with connect(f"{s.ws}/websocket/offer") as ws:
                    refused = await asyncio.wait_for(ws.recv(), 5)
                    assert "concurrency_limit_reached" in str(refused)
                third = TwilioClient(f"{s.ws}/telephone/handler")
                async with third:
                    await third.wait_for(lambda: False, 3)
                assert third.heard.closed.is_set()
                assert len(s.store.opened) == opened, "a refused call did work"
                metrics = (await http.get("/metrics")).text
                assert "voicebot_lines_free 0.0" in metrics
                await phone.stop()
            await quiet.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert wait_until(s.idle, 10), s.state()


def test_the_pages_offers_take_lines_from_the_same_book(shared: Served) -> None:
    """The Gradio component answers offers itself (a Gradio server function, not our route):
    its offers are checked and counted too."""
    sdp = _valid_sdp()
    s = shared
    component = s.service.ui_stream.webrtc_component

    async def scenario() -> None:
        def outputs(_: Any) -> None:
            return None

        bad = await component.handle_offer(
            {"sdp": None, "type": "offer", "webrtc_id": "page-bad"}, outputs
        )
        assert bad["status"] == "failed" and bad["meta"]["error"] == "invalid_offer"
        held = [s.service.admit("api", f"held-{i}") for i in range(LIMIT)]
        busy = await component.handle_offer(
            {"sdp": sdp, "type": "offer", "webrtc_id": "page-busy"}, outputs
        )
        assert busy["meta"]["error"] == "concurrency_limit_reached"
        for line in held:
            assert line is not None
            line.release()

    asyncio.run(scenario())
    assert not any(open_entries(component).values())
    assert s.idle(), s.state()


# --- vanishing and stalling clients -----------------------------------------------------------


def test_silent_and_vanishing_websockets_free_their_lines(tmp_path: Path) -> None:
    # time_limit_s bounds a silent websocket: no start (closed after min(10 s, the time limit)),
    # or a start and then nothing (cut at the hard limit: time limit + goodbye grace).
    with served(tmp_path, time_limit_s=2.0) as s:
        baseline = thread_count()

        async def scenario() -> None:
            t0 = time.monotonic()
            never_starts = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
            started_silent = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
            await started_silent.start()
            assert await until(lambda: s.service.free_lines() == 0, 5)
            assert await until(lambda: never_starts.heard.closed.is_set(), 8)
            assert await until(lambda: started_silent.heard.closed.is_set(), 12)
            assert await until(lambda: s.service.free_lines() == LIMIT, 5), s.state()
            assert time.monotonic() - t0 < 15
            for client in (never_starts, started_silent):
                await client.close()

            # A client that vanishes mid-reply (TCP dropped, no close frame).
            vanishing = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
            await vanishing.start()
            asked = time.monotonic()
            await vanishing.speak(np.concatenate([tone(0.8), silence(0.8)]))
            assert await until(lambda: vanishing.heard.loud_since(asked + 0.8), 10)
            vanishing.vanish()
            gone = time.monotonic()
            assert await until(s.idle, 10), s.state()
            print(f"websocket line freed {time.monotonic() - gone:.2f} s after the client vanished")

        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert wait_until(lambda: thread_count() <= baseline + 2, 10), (thread_names(), baseline)


VANISHING_CALLER = """
import asyncio, sys
import httpx
from tests.support_served import RtcCaller, until

async def main(base):
    caller = RtcCaller(base)
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        async def post(offer):
            return (await http.post("/webrtc/offer", json=offer)).json()
        assert "sdp" in await caller.connect(post)
    assert await until(lambda: caller.loud_since(0), 20)
    print("replying", flush=True)  # the greeting is playing: vanish now
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


def test_an_aiortc_caller_that_vanishes_mid_reply_frees_its_line(
    shared: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server only learns through ICE consent freshness: 6 checks 5 s apart (30 s) by
    # default, shortened here to 2 checks 2 s apart; the mechanism is the same.
    monkeypatch.setattr("aioice.ice.CONSENT_INTERVAL", 2)
    monkeypatch.setattr("aioice.ice.CONSENT_FAILURES", 2)
    s = shared
    baseline = thread_count()
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CALLER, s.http],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "replying", proc.stderr.read() if proc.stderr else ""
        assert s.service.free_lines() == LIMIT - 1
        proc.send_signal(signal.SIGKILL)
        gone = time.monotonic()
    finally:
        proc.kill()
        proc.wait(10)
    # ICE consent freshness (here ~5 s), checked on aiortc's own timer: a loaded machine adds
    # a few seconds before FastRTC hears of it.
    assert wait_until(s.idle, 5 + 15), s.state()
    print(f"WebRTC line freed {time.monotonic() - gone:.1f} s after the caller vanished")
    assert wait_until(lambda: thread_count() <= baseline + 2, 10), (thread_names(), baseline)


# --- churn ------------------------------------------------------------------------------------


def test_churn_leaks_no_line_and_no_thread(shared: Served) -> None:
    s = shared
    baseline = thread_count()
    peak = [baseline]

    async def cycle(i: int) -> None:
        # A line is given back once the server has seen the socket end (a vanished one
        # takes a moment): wait for one, as a caller retrying after a busy answer would.
        assert await until(lambda: s.service.free_lines() > 0, 5), s.state()
        client = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
        if i % 3:
            await client.start()
            await client.speak(tone(0.1), pace=False)
        if i % 5 == 0:
            client.vanish()
        elif i % 2:
            await client.stop()
        await client.close()

    async def barge_in_call() -> None:
        client = await FastRTCSocket(f"{s.ws}/websocket/offer").open()
        await client.start()
        for _ in range(2):
            await client.speak(np.concatenate([tone(0.8), silence(0.7)]))
            asked = time.monotonic()
            await until(lambda a=asked: client.heard.loud_since(a), 5)  # type: ignore[misc]
            await client.speak(np.concatenate([tone(0.5), silence(0.7)]))  # talk over it
        await client.stop()
        await client.close()

    async def scenario() -> None:
        t0 = time.monotonic()
        for i in range(50):
            await cycle(i)
            peak[0] = max(peak[0], thread_count())
        assert await until(s.idle, 10), s.state()
        t1 = time.monotonic()
        await asyncio.gather(*(barge_in_call() for _ in range(LIMIT)))
        peak[0] = max(peak[0], thread_count())
        print(f"50 cycles {t1 - t0:.1f} s, calls at the limit {time.monotonic() - t1:.1f} s")

    asyncio.run(asyncio.wait_for(scenario(), 90))
    assert wait_until(s.idle, 15), s.state()
    assert wait_until(lambda: thread_count() <= baseline + 2, 10), (thread_names(), baseline)
    print(f"threads: baseline {baseline}, peak {peak[0]}, after {thread_count()}")
    assert s.store.turns, "the calls at the limit had turns"
