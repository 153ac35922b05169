"""Database chaos against real PostgreSQL servers: every turn ends up stored exactly once or
counted as lost, and ``record()`` never waits on the disk or the network.

Faults: a spool locked by another process while the database is dead and the queue is full;
latency injected between the store and the server; the spool on a full filesystem
(RLIMIT_FSIZE); two processes replaying one spool at once; PostgreSQL killed mid-call."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from tests import conftest as _conftest
from tests.db_chaos import DelayProxy
from tests.test_store import (
    UNREACHABLE,
    count_turns,
    make_turn,
    new_conversation,
    wait_for,
)
from voicebot.conversation import utc_now
from voicebot.store import PostgresTurnStore, Spool, turn_record

if not hasattr(_conftest, "pg_database"):  # until conftest imports tests.pg_fixtures
    from tests.pg_fixtures import *  # noqa: F403


def timed_records(store: PostgresTurnStore, cid: uuid.UUID, seqs: range) -> list[float]:
    """record() durations in ms."""
    durations = []
    for seq in seqs:
        turn = make_turn(cid, seq)
        t0 = time.perf_counter()
        store.record(turn)
        durations.append((time.perf_counter() - t0) * 1000)
    return durations


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


def test_record_never_waits_for_a_locked_spool(pg_dsn: str, tmp_path: Path, caplog) -> None:
    """Dead database, full queue, and the spool held by another process for a second: the old
    store took that lock on the caller's thread. Now the spooler waits, record() does not."""
    caplog.set_level(logging.INFO, logger="voicebot.store")
    spool = tmp_path / "spool.jsonl"
    spool.touch()
    conversation = new_conversation()
    cid = conversation.conversation_id
    n = 1500
    store = PostgresTurnStore(UNREACHABLE, spool, queue_size=2, connect_timeout_s=2.0).start()
    holder = os.open(spool, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process appending or replaying, stalled
    release = threading.Timer(1.0, lambda: fcntl.flock(holder, fcntl.LOCK_UN))
    try:
        store.open_conversation(conversation)
        release.start()
        durations = timed_records(store, cid, range(1, n + 1))
    finally:
        release.join()
        os.close(holder)
        store.close(timeout_s=0.5)
    print(
        f"\nrecord() with a dead database, a full queue and a locked spool: median"
        f" {statistics.median(durations):.3f} ms, p99 {p99(durations):.3f} ms,"
        f" max {max(durations):.1f} ms; stats {store.stats}"
    )
    assert p99(durations) <= 5.0
    assert store.stats["lost"] == 0
    assert len([r for r in Spool.read(spool) if r["kind"] == "turn"]) == n
    full = [r for r in caplog.records if "store queue full" in r.getMessage()]
    assert len(full) == 1  # logged once, not once per record

    with PostgresTurnStore(pg_dsn, spool) as replayer:
        assert wait_for(lambda: not replayer.spool.pending(), timeout_s=30)
    assert count_turns(pg_dsn, cid) == (n, n)


def test_latency_injected_between_store_and_server(pg_dsn: str, tmp_path: Path) -> None:
    """25 ms each way on every packet (a 50 ms round trip): the writer falls behind, record()
    does not, and every turn arrives once."""
    conversation = new_conversation()
    cid = conversation.conversation_id
    n = 400
    with DelayProxy(pg_dsn, delay_s=0.025) as proxy:
        store = PostgresTurnStore(proxy.dsn, tmp_path / "spool.jsonl", queue_size=20).start()
        try:
            store.open_conversation(conversation)
            durations = timed_records(store, cid, range(1, n + 1))
            store.close_conversation(cid, utc_now())
            assert wait_for(lambda: count_turns(pg_dsn, cid)[0] >= n, timeout_s=60)
            assert store.flush(30)
        finally:
            store.close(10)
    print(
        f"\nrecord() with 2 x 25 ms injected latency: median {statistics.median(durations):.3f} ms,"
        f" p99 {p99(durations):.3f} ms, max {max(durations):.1f} ms; stats {store.stats}"
    )
    assert p99(durations) <= 5.0
    assert count_turns(pg_dsn, cid) == (n, n)
    assert store.stats["lost"] == 0


_FULL_DISK_WRITER = """
import json, logging, resource, sys, uuid
from pathlib import Path
from typing import Any
from voicebot.conversation import Conversation, Turn
from voicebot.store import PostgresTurnStore
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
dsn, spool, cid, n = sys.argv[1], Path(sys.argv[2]), uuid.UUID(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))  # the disk fills after a few turns
store = PostgresTurnStore(dsn, spool, queue_size=5, connect_timeout_s=0.5).start()
store.open_conversation(Conversation(cid, persona="assistant-en", channel="web"))
for seq in range(1, n + 1):
    store.record(Turn(conversation_id=cid, sequence=seq, user_text=f"u{seq}" * 20))
store.close(5)
print(json.dumps(store.stats))
"""


def test_spool_on_a_full_filesystem_counts_the_loss(pg_dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    cid = uuid.uuid4()
    n = 200
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_WRITER, UNREACHABLE, str(spool), str(cid), str(n)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    spooled_turns = [r for r in Spool.read(spool) if r["kind"] == "turn"]
    print(f"\nfull filesystem: {len(spooled_turns)} turns spooled, stats {stats}")
    assert stats["lost"] > 0 and spooled_turns
    assert stats["lost"] + len(spooled_turns) == n  # every turn spooled or counted, never both
    assert proc.stderr.count("cannot write the spool") == 1  # logged once
    assert "Traceback" not in proc.stderr

    with PostgresTurnStore(pg_dsn, spool) as replayer:
        assert wait_for(lambda: not replayer.spool.pending(), timeout_s=30)
    stored, distinct = count_turns(pg_dsn, cid)
    assert stored == distinct == len(spooled_turns)
    assert stored + stats["lost"] == n


_REPLAYER = """
import json, sys, time
from pathlib import Path
from typing import Any
from voicebot.store import PostgresTurnStore
dsn, spool, go = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, go - time.time()))  # start together
store = PostgresTurnStore(dsn, spool).start()
deadline = time.monotonic() + 60
while store.spool.pending() and time.monotonic() < deadline:
    time.sleep(0.05)
store.close(10)
print(json.dumps(store.stats))
"""


def test_two_processes_replay_one_spool_each_turn_once(pg_dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    conversation = new_conversation()
    cid = conversation.conversation_id
    n = 2000
    records = [turn_record(make_turn(cid, seq)) for seq in range(1, n + 1)]
    for start in range(0, n, 500):  # several files, as successive outages leave
        Spool(spool).append(records[start : start + 500])
        Spool(spool).take()
    go = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REPLAYER, pg_dsn, str(spool), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    print(f"\ntwo replayers: {stats}")
    assert count_turns(pg_dsn, cid) == (n, n)
    # each file replayed by one of them: none twice
    assert sum(s["replayed"] for s in stats) == n
    assert not Spool(spool).pending()


def _postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def test_postgres_killed_mid_call(pg_restartable, tmp_path: Path) -> None:
    """Immediate shutdown (SIGQUIT: no checkpoint, every session cut) in the middle of a call,
    then crash recovery: each turn stored exactly once, record() never slow."""
    server = pg_restartable
    conversation = new_conversation()
    cid = conversation.conversation_id
    store = PostgresTurnStore(server.dsn, tmp_path / "spool.jsonl", retry_max_s=0.5).start()
    durations: list[float] = []
    try:
        store.open_conversation(conversation)
        durations += timed_records(store, cid, range(1, 11))
        assert store.flush(10)
        data_dir = server.settings.pg_data_dir.expanduser().resolve()
        pid = _postmaster_pid(data_dir)
        os.kill(pid, signal.SIGQUIT)
        assert wait_for(lambda: not _alive(pid), timeout_s=30)
        for seq in range(11, 31):
            durations += timed_records(store, cid, range(seq, seq + 1))
            time.sleep(0.01)
        server.stop()  # forget the dead server
        server.start()  # crash recovery, same data dir and socket
        durations += timed_records(store, cid, range(31, 41))
        store.close_conversation(cid, utc_now())
        assert wait_for(lambda: count_turns(server.dsn, cid)[0] >= 40, timeout_s=40)
        assert store.flush(10)
    finally:
        store.close(5)
    print(
        f"\nPostgreSQL killed mid-call: record() median {statistics.median(durations):.3f} ms,"
        f" p99 {p99(durations):.3f} ms; stats {store.stats}"
    )
    assert count_turns(server.dsn, cid) == (40, 40)
    assert p99(durations) <= 5.0 and store.stats["lost"] == 0
    with psycopg.connect(server.dsn) as conn:
        row = conn.execute("SELECT ended_at FROM conversations WHERE id = %s", (cid,)).fetchone()
    assert row is not None and row[0] is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until its parent reaps it: look at its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_lost_turns_reach_the_metric(tmp_path: Path, caplog) -> None:
    """A spool that cannot be written at all (its directory is a file) and no database: every
    turn is counted, the metric says so, one error line says why."""
    from voicebot.metrics import Metrics

    caplog.set_level(logging.INFO, logger="voicebot.store")
    (tmp_path / "not-a-dir").write_text("")
    store = PostgresTurnStore(UNREACHABLE, tmp_path / "not-a-dir" / "spool.jsonl", queue_size=2)
    metrics = Metrics()
    metrics.track_turns_lost(lambda: store.lost_turns)
    store.start()
    cid = uuid.uuid4()
    timed_records(store, cid, range(1, 51))
    store.close(timeout_s=3)
    assert store.lost_turns == 50
    assert "voicebot_turns_lost_total 50.0" in metrics.render().decode()
    errors = [r for r in caplog.records if "cannot write the spool" in r.getMessage()]
    # once when the losses start, and at most once more when the store closes with the total
    assert 1 <= len(errors) <= 2


def test_a_stalled_database_leaves_no_gap_in_the_reply_audio(pg_dsn: str, tmp_path: Path) -> None:
    """A call on FastRTC's websocket (the real served app and audio path, fakes at the model
    seams) whose turn log (store, feed, readiness) goes through a proxy. One turn with the
    database healthy, then the proxy stops forwarding (a hung database: connections open,
    nothing answers) for two turns: the first one's record waits on the database while the
    second reply plays. The largest gap between reply frames as the caller receives them stays
    within 200 ms of the healthy reply's largest (same run), every reply is heard, and once
    the database answers again every turn is stored.

    Also the pace: FastRTC's websocket sends one queued ``emit`` result per 20 ms, ``None``
    included; an ``emit`` that gave up after 10 ms halved a reply's pace and put each reply
    0.5 s later per idle second of the call (1.6 s, 6 s, 15 s, then none)."""
    import asyncio
    import dataclasses

    from fastapi import FastAPI

    from tests import fakes
    from tests.audio_gaps import measured_turn
    from tests.support_served import FastRTCSocket, served_runtime
    from tests.test_telephony import LiveServer, backend_of
    from voicebot.server import mount
    from voicebot.settings import Settings

    question = fakes.tone(0.6)
    with DelayProxy(pg_dsn, delay_s=0.0) as proxy:
        store = PostgresTurnStore(
            proxy.dsn, tmp_path / "spool.jsonl", connect_timeout_s=1.0, retry_max_s=0.5
        ).start()
        base = served_runtime()
        runtime = dataclasses.replace(
            base,
            store=store,
            stacks={
                name: dataclasses.replace(stack, synthesizer=fakes.ToneSynthesizer(0.015))
                for name, stack in base.stacks.items()
            },
        )
        app = FastAPI()
        mount(
            app,
            "",
            settings=Settings(data_dir=tmp_path, concurrency_limit=2),
            backend=backend_of(runtime, proxy.dsn),
        )

        async def call() -> tuple[list[Any], list[Any]]:
            client = await FastRTCSocket(f"{live.ws}/websocket/offer").open()
            await client.start()
            await client.speak(fakes.silence(1.0))  # the greeting
            healthy = [await measured_turn(client, question, "healthy", quiet_s=0.6)]
            proxy.stall()
            try:
                stalled = [
                    await measured_turn(client, question, f"stalled {i}", quiet_s=0.6)
                    for i in (1, 2)
                ]
            finally:
                proxy.resume()
            await client.stop()
            await client.close()
            return healthy, stalled

        try:
            with LiveServer(app) as live:
                healthy, stalled = asyncio.run(asyncio.wait_for(call(), 60))
            assert store.flush(20)
        finally:
            store.close(5)
    print("\n" + "\n".join(r.line() for r in healthy + stalled) + f"\nstore {store.stats}")
    assert all(r.heard and r.leftover_frames == 0 for r in healthy + stalled)
    bound = max(r.max_gap_ms for r in healthy) + 200
    assert max(r.max_gap_ms for r in stalled) <= bound
    for r in healthy + stalled:  # frames at real-time pace, replies not later turn by turn
        assert r.span_s <= 1.5 * (r.frames - 1) * 0.02, r.line()
        assert r.first_audio_s <= healthy[0].first_audio_s + 1.5, r.line()
    assert store.stats["lost"] == 0
