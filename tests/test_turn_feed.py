"""Live transcripts over SSE on the real server and a real PostgreSQL: one LISTEN connection per
process however many watch, every subscriber gets every turn, a clear refusal past the cap, and
an ended conversation returns its turns and ends."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from tests import conftest as _conftest
from tests.support_served import LiveServer, backend_of, served_runtime
from tests.test_store import make_turn, new_conversation
from voicebot import migrations
from voicebot.server import mount
from voicebot.settings import Settings
from voicebot.store import FeedFull, PostgresTurnStore, TurnLog

if not hasattr(_conftest, "pg_database"):  # until conftest imports tests.pg_fixtures
    from tests.pg_fixtures import *  # noqa: F403

SUBSCRIBERS = 120  # more than PostgreSQL's default max_connections (100)


def voicebot_connections(dsn: str) -> dict[str, int]:
    """Open connections to this database by application_name (ours are voicebot-*)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE %s"
            " GROUP BY application_name",
            ("voicebot-%",),
        ).fetchall()
    return dict(rows)


def migrated(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn)
    return dsn


async def watch(http: httpx.AsyncClient, path: str, connected: asyncio.Event | None = None):
    """(status, [(event, data)...]) of one SSE stream, until its ``end`` event."""
    events: list[tuple[str, Any]] = []
    async with http.stream("GET", path) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return reply.status_code, [("error", reply.json())]
        kind = ""
        async for line in reply.aiter_lines():
            if line.startswith(": connected") and connected is not None:
                connected.set()
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "end":
                    break
    return 200, events


def test_sse_fan_out_one_connection_all_events_cap_and_ended_call(
    pg_fresh_dsn: str, tmp_path: Path
) -> None:
    dsn = migrated(pg_fresh_dsn)
    app = FastAPI()
    service = mount(
        app, "", settings=Settings(data_dir=tmp_path), backend=backend_of(served_runtime(), dsn)
    )
    conversation = new_conversation()
    cid = conversation.conversation_id
    path = f"/api/conversations/{cid}/events"
    with (
        LiveServer(app) as live,
        PostgresTurnStore(dsn, tmp_path / "spool.jsonl") as store,
    ):
        store.open_conversation(conversation)
        store.record(make_turn(cid, 1))
        assert store.flush(10)
        assert service.turn_log is not None
        service.turn_log.feed.max_subscribers = SUBSCRIBERS

        async def scenario() -> None:
            limits = httpx.Limits(max_connections=SUBSCRIBERS + 20)
            async with httpx.AsyncClient(base_url=live.http, timeout=90, limits=limits) as http:
                connected = [asyncio.Event() for _ in range(SUBSCRIBERS)]
                watchers = [
                    asyncio.create_task(watch(http, f"{path}?backlog=5", connected[i]))
                    for i in range(SUBSCRIBERS)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in connected)), 90)
                assert service.turn_log is not None
                assert service.turn_log.feed.subscribers == SUBSCRIBERS

                # The cap: one more is refused at once, with a reason.
                status, refused = await watch(http, path)
                assert status == 503
                assert "too many live-transcript subscribers" in refused[0][1]["detail"]

                connections = await asyncio.to_thread(voicebot_connections, dsn)
                print(f"\n{SUBSCRIBERS} subscribers: connections {connections}")
                assert connections.get("voicebot-feed") == 1
                assert connections.get("voicebot-api", 0) <= 4

                def rest_of_the_call() -> None:
                    for seq in (2, 3, 4):
                        store.record(make_turn(cid, seq))
                    store.close_conversation(cid, make_turn(cid, 9).started_at)
                    assert store.flush(10)

                await asyncio.to_thread(rest_of_the_call)
                results = await asyncio.wait_for(asyncio.gather(*watchers), 60)
                for status, events in results:
                    assert status == 200
                    kinds = [k for k, _ in events]
                    assert kinds == ["turn"] * 4 + ["end"], kinds
                    assert [d["turn"] for k, d in events if k == "turn"] == [1, 2, 3, 4]
                    first = events[0][1]
                    assert set(first["timings"]) >= {"llm_first_chunk_ms", "v2v_ms"}

                # Subscribing to a call that has ended: its turns, then the end (no hang).
                status, late = await asyncio.wait_for(watch(http, path), 10)
                assert status == 200
                assert [k for k, _ in late] == ["turn"] * 4 + ["end"]

                # Every slot was given back when the streams ended.
                for _ in range(50):
                    if service.turn_log.feed.subscribers == 0:
                        break
                    await asyncio.sleep(0.1)
                assert service.turn_log.feed.subscribers == 0

                detail = (await http.get(f"/api/conversations/{cid}")).json()
                assert [t["turn"] for t in detail["turns"]] == [1, 2, 3, 4]
                assert detail["ended_at"] is not None

        asyncio.run(scenario())


def test_conversation_detail_has_every_timing(pg_fresh_dsn: str, tmp_path: Path) -> None:
    dsn = migrated(pg_fresh_dsn)
    app = FastAPI()
    mount(app, "", settings=Settings(data_dir=tmp_path), backend=backend_of(served_runtime(), dsn))
    conversation = new_conversation()
    cid = conversation.conversation_id
    turn = make_turn(cid, 1)
    turn.timings.llm_first_chunk_ms = 333.5
    turn.timings.first_sound_ms = 512.5
    turn.acknowledgement, turn.assistant_text = "Sure,", "Sure, answer 1"
    with PostgresTurnStore(dsn, tmp_path / "spool.jsonl") as store:
        store.open_conversation(conversation)
        store.record(turn)
        assert store.flush(10)
    with LiveServer(app) as live, httpx.Client(base_url=live.http, timeout=30) as http:
        detail = http.get(f"/api/conversations/{cid}").json()
        listed = http.get("/api/conversations", params={"limit": 5}).json()
    assert detail["turns"][0]["timings"]["llm_first_chunk_ms"] == 333.5
    assert detail["turns"][0]["timings"]["first_sound_ms"] == 512.5
    assert detail["turns"][0]["acknowledgement"] == "Sure,"
    assert detail["turns"][0]["turn_id"] == str(turn.turn_id)
    assert [c["id"] for c in listed] == [str(cid)] and listed[0]["turns"] == 1


def test_feed_survives_a_database_restart(pg_restartable, tmp_path: Path, caplog) -> None:
    """The listening connection drops with the server; the feed reconnects, logs it once, and
    subscribers get what was recorded meanwhile and after."""
    caplog.set_level(logging.INFO, logger="voicebot.store")
    server = pg_restartable
    conversation = new_conversation()
    cid = conversation.conversation_id

    async def scenario() -> list[int]:
        log = TurnLog(server.dsn, timeout_s=2.0)
        log.feed._retry_max_s = 0.5
        await log.start()
        store = PostgresTurnStore(server.dsn, tmp_path / "spool.jsonl", retry_max_s=0.5).start()
        try:
            await asyncio.wait_for(log.feed.connected.wait(), 10)
            store.open_conversation(conversation)
            subscription = await log.subscribe(cid)
            got: list[int] = []

            async def collect() -> None:
                async for turn in subscription:
                    got.append(turn.sequence)

            collector = asyncio.create_task(collect())
            store.record(make_turn(cid, 1))
            await asyncio.to_thread(store.flush, 10)
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.stop)
            store.record(make_turn(cid, 2))  # spooled while the server is down
            await asyncio.to_thread(server.start)
            store.record(make_turn(cid, 3))
            store.close_conversation(cid, make_turn(cid, 9).started_at)
            await asyncio.wait_for(collector, 30)
            return got
        finally:
            await asyncio.to_thread(store.close, 5)
            await log.close()

    got = asyncio.run(scenario())
    assert sorted(got) == [1, 2, 3]
    lost = [r for r in caplog.records if "lost the turn log's connection" in r.getMessage()]
    assert len(lost) == 1


def test_feed_full_is_a_store_stage_error() -> None:
    error = FeedFull(3)
    assert error.stage == "store" and "limit 3" in str(error)


@pytest.mark.parametrize("payload", ['{"conversation_id": "x"}', "not json", "[]"])
def test_malformed_notification_is_ignored(payload: str) -> None:
    from voicebot.store.feed import parse_notification

    assert parse_notification(payload) is None
