"""Past one machine, on loopback: HAProxy (Debian) in front of two ``voicebot serve`` replicas
(2 lines each) on one embedded PostgreSQL, with aiortc callers.

HAProxy runs the shipped ``deploy/haproxy/haproxy.cfg`` with loopback addresses. Only the
HTTP offer goes through it; the call's media flows between the aiortc client and the replica
directly (host candidates on 127.0.0.1).

The tests share one cluster and run in file order: four calls are set up once, the busy,
stickiness and SSE checks use them, and the SIGTERM drain comes last. The readiness and
drain checks (``test_full_*`` and ``test_drain_*``) need the serverlines work (``/readyz``
503 when full or draining, a polite drain on SIGTERM).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import psycopg
import pytest

from tests.support_voice import KeywordScript, free_port, joe, say
from tests.test_webrtc import Microphone, Speaker
from voicebot.audio import resample
from voicebot.ollama_server import OllamaProtocolServer

# Two replicas load their models at once: on a busy 2-core machine that alone takes minutes.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
RATE = 48000
ANSWER = "Paris is the capital of France."
DRAIN_TIMEOUT_S = 4.0
T = TypeVar("T")


# -- processes ---------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@dataclass
class Replica(Process):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_replica(name: str, tmp: Path, dsn: str, ollama: str, stt: Path, voice: Path) -> Replica:
    port = free_port()
    # One persona: the replicas load only what the calls use.
    personas = tmp / "personas"
    personas.mkdir(exist_ok=True)
    shutil.copy(ROOT / "personas" / "assistant-en.toml", personas)
    env = {
        **os.environ,
        "VOICEBOT_DATA_DIR": str(tmp / name),
        "VOICEBOT_DATABASE_URL": dsn,
        "VOICEBOT_CONCURRENCY_LIMIT": "2",
        "VOICEBOT_HOST": "127.0.0.1",
        "VOICEBOT_PORT": str(port),
        "VOICEBOT_PERSONA": "assistant-en",
        "VOICEBOT_PERSONAS_DIR": str(personas),
        "VOICEBOT_STT_MODEL": str(stt),
        "VOICEBOT_TTS_VOICE": str(voice),
        "OLLAMA_HOST": ollama,
        "VOICEBOT_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    # Without cached bytecode each replica compiles gradio, scipy & co. again (about a minute
    # on a busy 2-core machine); let them write it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    log = tmp / f"{name}.log"
    cli = Path(sys.executable).parent / "voicebot"
    popen = subprocess.Popen(
        [str(cli), "serve", "--no-ui"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Replica(name, popen, log, port)


def start_haproxy(tmp: Path, replicas: list[Replica]) -> tuple[Process, str, str]:
    lb, stats = free_port(), free_port()
    env = {
        **os.environ,
        "VOICEBOT_LB_BIND": f"127.0.0.1:{lb}",
        "HAPROXY_STATS_BIND": f"127.0.0.1:{stats}",
        "VOICEBOT_REPLICA_1": f"127.0.0.1:{replicas[0].port}",
        "VOICEBOT_REPLICA_2": f"127.0.0.1:{replicas[1].port}",
    }
    log = tmp / "haproxy.log"
    popen = subprocess.Popen(
        ["haproxy", "-db", "-f", str(HAPROXY_CFG)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Process("haproxy", popen, log), f"http://127.0.0.1:{lb}", f"http://127.0.0.1:{stats}"


def server_states(stats_url: str) -> dict[str, str]:
    """HAProxy's view of each replica: UP, DOWN, ... (from the stats CSV)."""
    text = httpx.get(f"{stats_url}/stats;csv", timeout=2).text.lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {
        r["svname"]: r["status"].split()[0]
        for r in rows
        if r["pxname"] == "replicas" and r["svname"].startswith("replica")
    }


def wait_for(predicate: Any, within_s: float, what: str, *procs: Process) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        for proc in procs:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited ({proc.popen.returncode})\n{proc.tail()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n" + "\n".join(p.tail() for p in procs))


# -- an event loop for the callers, shared by the tests ------------------------------------


class LoopThread:
    """One asyncio loop in a thread: the aiortc calls outlive each test function."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="callers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def until(predicate: Any, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


@dataclass
class Caller:
    """One aiortc caller whose offer goes through HAProxy."""

    webrtc_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: int = 0
    answer: dict[str, Any] = field(default_factory=dict)
    served_by: str = ""
    pc: Any = None
    microphone: Any = None
    speaker: Any = None
    updates: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def connect(self, lb_url: str) -> bool:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        self.pc = RTCPeerConnection()  # no ICE servers: loopback host candidates
        self.microphone, self.speaker = Microphone(), Speaker()
        self.pc.createDataChannel("text")

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            self.tasks.append(asyncio.ensure_future(self.speaker.play(track)))

        self.pc.addTrack(self.microphone.track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer", "webrtc_id": self.webrtc_id}
        async with httpx.AsyncClient(timeout=15) as http:
            reply = await http.post(f"{lb_url}/webrtc/offer", json=offer)
        self.status, self.served_by = reply.status_code, reply.headers.get("x-served-by", "")
        self.answer = reply.json()
        if "sdp" not in self.answer:
            await self.pc.close()
            return False
        await self.pc.setRemoteDescription(
            RTCSessionDescription(self.answer["sdp"], self.answer["type"])
        )
        return True

    def follow(self, replica_url: str) -> None:
        """Collect this call's turn updates from the replica that holds it."""
        self.tasks.append(asyncio.ensure_future(self._follow(replica_url)))

    async def _follow(self, replica_url: str) -> None:
        url = f"{replica_url}/api/calls/{self.webrtc_id}/events"
        async for event, data in sse(url):
            if event == "turn":
                self.updates.append(data)

    async def greeted(self) -> bool:
        heard = await until(lambda: self.speaker.loud_since(0) is not None, 30)
        return heard and await until(lambda: self.speaker.quiet_for(0.6), 20)

    async def ask(self, speech: np.ndarray) -> np.ndarray | None:
        """Say ``speech``; the reply's audio once it is over, or None if none came."""
        self.microphone.speech_end_t = None
        self.microphone.say(speech)
        await until(lambda: self.microphone.speech_end_t is not None, 15)
        end = self.microphone.speech_end_t
        assert end is not None
        if not await until(lambda: self.speaker.loud_since(end) is not None, 40):
            return None
        await until(lambda: self.speaker.quiet_for(1.5), 20)  # the whole answer, even if slow
        return self.speaker.audio_since(end)

    def final_turns(self) -> list[dict[str, Any]]:
        """This call's finished turns (the greeting, sequence 0, left out)."""
        return [u["turn"] for u in self.updates if u["final"] and u["turn"]["turn"] > 0]

    def conversation_id(self) -> str | None:
        for update in self.updates:
            return str(update["turn"]["conversation_id"])
        return None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()


async def sse(url: str) -> Any:
    """(event, data) pairs from a server-sent-events URL."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as http,
        http.stream("GET", url) as reply,
    ):
        reply.raise_for_status()
        event = "message"
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, json.loads(line[6:])
                event = "message"


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class Cluster:
    replicas: dict[str, Replica]
    """By HAProxy's server name (replica1, replica2)."""
    haproxy: Process
    lb_url: str
    stats_url: str
    dsn: str
    loop: LoopThread
    speech: np.ndarray
    calls: list[Caller] = field(default_factory=list)
    replies: dict[str, float] = field(default_factory=dict)
    """Seconds of loud reply audio each call received, by webrtc_id."""

    def holder(self, call: Caller) -> Replica:
        return self.replicas[call.served_by]

    def other(self, call: Caller) -> Replica:
        (other,) = (r for n, r in self.replicas.items() if n != call.served_by)
        return other

    def logs(self) -> str:
        return "\n".join(p.tail() for p in [*self.replicas.values(), self.haproxy])


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    pg_dsn: str,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
) -> Iterator[Cluster]:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    tmp = tmp_path_factory.mktemp("cluster")
    with OllamaProtocolServer("gpu-8b", script=KeywordScript([("france", ANSWER)])) as ollama:
        names = ("replica1", "replica2")
        replicas = {
            n: start_replica(n, tmp, pg_dsn, ollama.base_url, tiny_en_model_dir, joe_voice_path)
            for n in names
        }
        haproxy, lb_url, stats_url = start_haproxy(tmp, list(replicas.values()))
        loop = LoopThread()
        rate, question = say(joe(joe_voice_path), "What is the capital of France?")
        speech = (np.clip(resample(question, rate, RATE), -1, 1) * 32767).astype(np.int16)
        everything = [*replicas.values(), haproxy]
        try:
            for replica in replicas.values():
                wait_for(
                    lambda r=replica: httpx.get(f"{r.url}/healthz", timeout=1).status_code == 200,
                    300,
                    f"{replica.name} to serve",
                    *everything,
                )
            wait_for(
                lambda: set(server_states(stats_url).values()) == {"UP"},
                20,
                "HAProxy to see both replicas up",
                *everything,
            )
            yield Cluster(
                replicas,
                haproxy,
                lb_url,
                stats_url,
                pg_dsn,
                loop,
                speech,
            )
        finally:
            try:
                loop.run(_close_all(list(_open_calls)), timeout=15)
            finally:
                loop.close()
                for proc in everything:
                    proc.stop()


_open_calls: list[Caller] = []


async def _close_all(calls: list[Caller]) -> None:
    await asyncio.gather(*(c.close() for c in calls), return_exceptions=True)


async def _four_calls(cluster: Cluster) -> list[Caller]:
    calls = [Caller() for _ in range(4)]
    _open_calls.extend(calls)
    admitted = await asyncio.gather(*(c.connect(cluster.lb_url) for c in calls))
    assert all(admitted), [(c.status, c.answer) for c in calls]
    for call in calls:
        call.follow(cluster.holder(call).url)
    assert all(await asyncio.gather(*(c.greeted() for c in calls))), "a caller heard no greeting"
    await asyncio.gather(*(c.ask(cluster.speech) for c in calls))
    # The turn as the replica recorded it: the scripted answer, played to the end.
    await until(lambda: all(c.final_turns() for c in calls), 30)
    await asyncio.sleep(0.5)
    for call in calls:
        end = call.microphone.speech_end_t
        reply = call.speaker.audio_since(end)
        cluster.replies[call.webrtc_id] = np.count_nonzero(np.abs(reply) > 0.02) / RATE
    return calls


@pytest.fixture(scope="module")
def calls(cluster: Cluster) -> list[Caller]:
    """Four calls through HAProxy, each greeted and then answered once."""
    cluster.calls = cluster.loop.run(_four_calls(cluster), timeout=150)
    return cluster.calls


# -- what works on any replica -------------------------------------------------------------


def test_four_calls_through_haproxy_are_admitted_and_answered(
    cluster: Cluster, calls: list[Caller]
) -> None:
    assert sorted(c.served_by for c in calls) == ["replica1", "replica1", "replica2", "replica2"]
    for call in calls:
        # Audio came back over WebRTC, and it was the answer, heard to the end.
        (turn,) = call.final_turns()
        assert cluster.replies[call.webrtc_id] > 0.15, (turn, cluster.replies)
        assert turn["user_text"].lower().startswith("what is the capital"), turn
        assert turn["assistant_text"] == ANSWER, turn
        assert not turn["interrupted"]


def test_the_fifth_call_gets_the_busy_answer(cluster: Cluster, calls: list[Caller]) -> None:
    fifth = Caller()
    admitted = cluster.loop.run(fifth.connect(cluster.lb_url))
    assert not admitted
    assert fifth.status == 503
    assert fifth.answer["meta"]["error"] == "concurrency_limit_reached", fifth.answer
    assert "busy" in fifth.answer["detail"]


def test_ice_candidates_stick_to_the_replica_that_answered_the_offer(
    cluster: Cluster, calls: list[Caller]
) -> None:
    call = calls[0]
    candidate = {
        "candidate": "candidate:9 1 udp 2122260223 127.0.0.1 9 typ host generation 0 ufrag x "
        "network-id 1",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    }
    body = {"type": "ice-candidate", "webrtc_id": call.webrtc_id, "candidate": candidate}
    for _ in range(4):  # without stickiness, leastconn would alternate replicas
        reply = httpx.post(f"{cluster.lb_url}/webrtc/offer", json=body, timeout=5)
        assert reply.headers["x-served-by"] == call.served_by
        assert reply.json().get("meta", {}).get("error") != "unknown_connection", reply.json()


def test_sse_on_one_replica_streams_a_call_held_on_the_other(
    cluster: Cluster, calls: list[Caller]
) -> None:
    call = calls[0]
    conversation = call.conversation_id()
    assert conversation is not None, f"no turn update from {call.served_by}"
    other = cluster.other(call)

    async def watch_and_ask() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []

        async def watch() -> None:
            async for event, data in sse(f"{other.url}/api/conversations/{conversation}/events"):
                if event == "turn":
                    seen.append(data)

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.5)  # subscribed before the turn is recorded
        assert await call.ask(cluster.speech) is not None
        await until(lambda: bool(seen), 15)
        watcher.cancel()
        return seen

    seen = cluster.loop.run(watch_and_ask(), timeout=90)
    assert seen, f"replica {other.name} streamed nothing\n{cluster.logs()}"
    turn = seen[-1]
    assert turn["conversation_id"] == conversation
    assert turn["turn"] == 2
    assert "Paris" in turn["assistant_text"]


# -- needs the serverlines branch: readiness when full, drain on SIGTERM -----------------------


def test_full_replicas_are_not_ready_and_haproxy_takes_them_out(
    cluster: Cluster, calls: list[Caller]
) -> None:
    for replica in cluster.replicas.values():
        assert httpx.get(f"{replica.url}/readyz", timeout=5).status_code == 503
    wait_for(
        lambda: set(server_states(cluster.stats_url).values()) == {"DOWN"},
        8,
        "HAProxy to take the full replicas out",
    )


@dataclass
class Drain:
    """What happened when the replica holding ``call`` got SIGTERM mid-call."""

    call: Caller
    replica: Replica
    new_call: Caller
    goodbye_heard: bool
    closed: bool
    exit_code: int | None
    turns: int
    ended_at: Any


@pytest.fixture(scope="module")
def drain(cluster: Cluster, calls: list[Caller]) -> Drain:
    call = calls[0]
    replica, other = cluster.holder(call), cluster.other(call)
    # Free a line on the other replica, so a new call has somewhere to go.
    leaving = next(c for c in calls if c.served_by == other.name)
    cluster.loop.run(leaving.close())
    wait_for(
        lambda: cluster.loop.run(_active_calls(other.url)) < 2,
        40,
        f"{other.name} to see the call leave",
    )
    signalled = time.monotonic()
    replica.popen.send_signal(signal.SIGTERM)

    async def observe() -> tuple[Caller, bool, bool]:
        new_call = Caller()
        _open_calls.append(new_call)
        # Retry while HAProxy has not yet noticed the draining replica.
        for _ in range(20):
            if await new_call.connect(cluster.lb_url):
                break
            await asyncio.sleep(0.25)
            new_call = Caller()
            _open_calls.append(new_call)
        goodbye = await until(
            lambda: call.speaker.loud_since(signalled) is not None, DRAIN_TIMEOUT_S + 6
        )
        # The replica closes a drained call's connection once its goodbye has played (at most
        # DRAIN_GOODBYE_S = 15 s after the goodbye began), then exits.
        closed = await until(lambda: call.pc.connectionState in ("closed", "failed"), 25)
        return new_call, goodbye, closed

    new_call, goodbye, closed = cluster.loop.run(observe(), timeout=90)
    try:
        exit_code: int | None = replica.popen.wait(15)
    except subprocess.TimeoutExpired:
        exit_code = None
    conversation = call.conversation_id()
    with psycopg.connect(cluster.dsn) as conn:
        turns = conn.execute(
            "SELECT count(*) FROM turns WHERE conversation_id = %s", (conversation,)
        ).fetchone()
        ended = conn.execute(
            "SELECT ended_at FROM conversations WHERE id = %s", (conversation,)
        ).fetchone()
    return Drain(
        call,
        replica,
        new_call,
        goodbye,
        closed,
        exit_code,
        turns[0] if turns else 0,
        ended[0] if ended else None,
    )


async def _active_calls(url: str) -> int:
    async with httpx.AsyncClient(timeout=3) as http:
        text = (await http.get(f"{url}/metrics")).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("voicebot_calls_active{")
        )
    )


def test_drain_new_calls_go_to_the_other_replica(cluster: Cluster, drain: Drain) -> None:
    assert drain.new_call.status == 200, (drain.new_call.answer, cluster.logs())
    assert drain.new_call.served_by == cluster.other(drain.call).name


def test_drain_ends_the_call_politely_with_every_turn_stored(
    cluster: Cluster, drain: Drain
) -> None:
    assert drain.goodbye_heard, f"no goodbye after SIGTERM\n{drain.replica.tail()}"
    assert drain.closed, "the drained call was not closed"
    # Every turn the caller finished is stored before the replica left (the second question
    # may still be under way when the drain's goodbye starts; then it is the only one).
    assert drain.turns >= 1
    assert drain.ended_at is not None, "the conversation was never ended"


def test_drain_the_drained_replica_exits_zero(cluster: Cluster, drain: Drain) -> None:
    assert drain.exit_code == 0, drain.replica.tail()
