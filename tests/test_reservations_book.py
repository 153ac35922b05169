"""The reservations table in the real embedded PostgreSQL: booking, idempotency, capacity under
concurrency, rollback on cancel, the CLI and the API route."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time as clock
import uuid
from datetime import date, time

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from voicebot.reservations.api import reservations_router
from voicebot.reservations.book import ReservationBook, lock_slot

DAY = date(2026, 12, 5)
AT = time(19, 0)


@pytest.fixture
def pool(pg_dsn):
    with ConnectionPool(pg_dsn, min_size=1, max_size=8, open=True) as p:
        yield p


@pytest.fixture
def book(pool):
    return ReservationBook(pool, lock_timeout_s=5.0)


@pytest.fixture
def restaurant():
    return f"test-{uuid.uuid4().hex[:10]}"


def take(book, restaurant, *, party=2, conversation=None, seats=12, at=AT, name="Tanaka", **kw):
    return book.book(
        restaurant=restaurant,
        seats_per_slot=seats,
        name=name,
        day=DAY,
        at=at,
        party_size=party,
        requests=kw.pop("requests", ""),
        conversation_id=conversation or uuid.uuid4(),
        **kw,
    )


def rows(pg_conn, restaurant):
    return pg_conn.execute(
        "SELECT name, party_size, conversation_id, cancelled_at FROM reservations"
        " WHERE restaurant = %s ORDER BY id",
        (restaurant,),
    ).fetchall()


def test_a_booking_is_one_row_with_its_conversation(book, restaurant, pg_conn):
    cid = uuid.uuid4()
    booking = take(book, restaurant, conversation=cid, requests="window seat")
    assert booking.created and booking.reservation is not None
    assert booking.reservation.conversation_id == cid
    assert booking.reservation.requests == "window seat"
    assert rows(pg_conn, restaurant) == [("Tanaka", 2, cid, None)]


def test_idempotent_per_conversation_and_slot(book, restaurant, pg_conn):
    cid = uuid.uuid4()
    first = take(book, restaurant, conversation=cid)
    again = take(book, restaurant, conversation=cid, party=3)
    assert first.created and not again.created
    assert again.reservation == first.reservation
    other_slot = take(book, restaurant, conversation=cid, at=time(19, 30))
    other_call = take(book, restaurant)
    assert other_slot.created and other_call.created
    assert len(rows(pg_conn, restaurant)) == 3


def test_capacity_per_slot(book, restaurant, pg_conn):
    assert take(book, restaurant, party=3, seats=4).created
    refused = take(book, restaurant, party=2, seats=4)
    assert refused.reservation is None and refused.seats_left == 1
    assert take(book, restaurant, party=1, seats=4).created
    assert take(book, restaurant, party=2, seats=4, at=time(20, 0)).created
    assert book.seats_taken(restaurant, DAY) == {AT: 4, time(20, 0): 2}
    assert len(rows(pg_conn, restaurant)) == 3


def test_concurrent_bookings_for_the_last_seats_never_overbook(book, restaurant, pg_conn):
    for round_ in range(4):
        at = time(12 + round_, 0)
        assert take(book, restaurant, party=2, seats=4, at=at).created  # 2 seats left
        barrier = threading.Barrier(4)
        results = []

        def race(at=at, barrier=barrier, results=results):
            barrier.wait()
            results.append(take(book, restaurant, party=2, seats=4, at=at))

        threads = [threading.Thread(target=race) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sum(r.created for r in results) == 1, results
        assert book.seats_taken(restaurant, DAY)[at] == 4
    assert len(rows(pg_conn, restaurant)) == 8


def test_cancelled_before_commit_stores_nothing(book, restaurant, pg_dsn, pg_conn):
    cancelled = threading.Event()
    result = []
    with psycopg.connect(pg_dsn) as holder:  # holds the slot, as another booking would
        with holder.transaction():
            lock_slot(holder, restaurant, DAY, AT)
            worker = threading.Thread(
                target=lambda: result.append(take(book, restaurant, cancelled=cancelled))
            )
            worker.start()
            clock.sleep(0.3)
            assert worker.is_alive()  # waiting for the slot
            cancelled.set()
    worker.join(10)
    assert result[0].cancelled and result[0].reservation is None
    assert rows(pg_conn, restaurant) == []


def test_arguments_are_data_never_sql(book, restaurant, pg_conn):
    name = "x'); DROP TABLE reservations; --"
    booking = take(book, restaurant, name=name, requests="'; DELETE FROM turns; --")
    assert booking.created
    assert rows(pg_conn, restaurant)[0][0] == name


def test_find_and_cancel(book, restaurant, pg_conn):
    take(book, restaurant, name="Tanaka")
    take(book, restaurant, name="Suzuki", at=time(20, 0))
    assert [r.name for r in book.find(restaurant=restaurant, name="tanaka")] == ["Tanaka"]
    cancelled = book.cancel(restaurant=restaurant, name="TANAKA", day=DAY, at=AT)
    assert [r.name for r in cancelled] == ["Tanaka"]
    assert book.cancel(restaurant=restaurant, name="Tanaka", day=DAY, at=AT) == []
    assert [r.name for r in book.bookings(restaurant=restaurant)] == ["Suzuki"]
    assert book.seats_taken(restaurant, DAY) == {time(20, 0): 2}


def test_database_failure_is_a_stage_error(restaurant):
    from voicebot.errors import StageError

    with ConnectionPool(
        "host=/nonexistent dbname=x", min_size=0, max_size=1, open=True, timeout=0.5
    ) as dead:
        with pytest.raises(StageError, match="reservations: cannot"):
            take(ReservationBook(dead, connect_timeout_s=0.5), restaurant)


# -- the CLI and the API ------------------------------------------------------------------


def test_cli_lists_bookings_as_json_lines(book, restaurant, pg_dsn, tmp_path):
    cid = uuid.uuid4()
    take(book, restaurant, conversation=cid, name="Tanaka", requests="birthday")
    take(book, restaurant, at=time(20, 0), name="Suzuki")
    env = os.environ | {"VOICEBOT_DATABASE_URL": pg_dsn, "VOICEBOT_DATA_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "voicebot.cli", "reservations", "--date", "2026-12-05", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    mine = [x for x in lines if x["restaurant"] == restaurant]
    assert [(x["name"], x["time"]) for x in mine] == [("Tanaka", "19:00"), ("Suzuki", "20:00")]
    first = mine[0]
    assert first["date"] == "2026-12-05" and first["party_size"] == 2
    assert first["requests"] == "birthday" and first["conversation_id"] == str(cid)
    assert {"name", "date", "time", "party_size", "requests", "conversation_id", "created_at"} <= (
        set(first)
    )
    text = subprocess.run(
        [sys.executable, "-m", "voicebot.cli", "reservations"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0 and "2026-12-05 19:00  2  Tanaka  (birthday)" in text.stdout
    bad = subprocess.run(
        [*cmd[:-3], "--date", "5 Dec"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


def test_api_route_lists_bookings(book, restaurant, pg_dsn):
    cid = uuid.uuid4()
    take(book, restaurant, conversation=cid)
    asyncio.run(_api_checks(restaurant, cid, pg_dsn))


async def _api_checks(restaurant, cid, pg_dsn):
    async with AsyncConnectionPool(pg_dsn, min_size=1, open=False) as apool:
        app = FastAPI()
        app.include_router(reservations_router(lambda: apool, prefix="/voice"))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            reply = await client.get("/voice/api/reservations", params={"date": "2026-12-05"})
            assert reply.status_code == 200
            mine = [x for x in reply.json() if x["restaurant"] == restaurant]
            assert mine[0]["conversation_id"] == str(cid) and mine[0]["time"] == "19:00"
            other_day = await client.get("/voice/api/reservations", params={"date": "2026-12-06"})
            assert all(x["restaurant"] != restaurant for x in other_day.json())
            bad = await client.get("/voice/api/reservations", params={"date": "tomorrow"})
            assert bad.status_code == 422 and "YYYY-MM-DD" in bad.json()["detail"]
    app = FastAPI()
    app.include_router(reservations_router(lambda: None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/api/reservations")).status_code == 503


def test_a_book_with_its_own_pool(pg_dsn, restaurant):
    with ReservationBook.connect(pg_dsn) as own:
        assert take(own, restaurant).created
        assert own.seats_taken(restaurant, DAY) == {AT: 2}
    assert own.pool.closed
