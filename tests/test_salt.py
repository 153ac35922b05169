"""The caller-hash salt: one per deployment. In the database (shared by every replica) when there
is a turn log; otherwise a file created atomically, readable only by its owner."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
from fastapi import FastAPI

from tests import conftest as _conftest
from tests.support_served import LiveServer, backend_of, served_runtime
from voicebot import migrations
from voicebot.server import mount
from voicebot.settings import Settings
from voicebot.store import TurnLog
from voicebot.telephony import caller_hash, load_salt

if not hasattr(_conftest, "pg_database"):  # until conftest imports tests.pg_fixtures
    from tests.pg_fixtures import *  # noqa: F403

_RACER = """
import json, sys, time
from pathlib import Path
from voicebot.telephony import load_salt
directory, go, n = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
salts = []
for i in range(n):
    time.sleep(max(0.0, go + i * 0.02 - time.time()))  # both processes at once, per file
    salts.append(load_salt(None, directory / f"salt-{i}").decode())
print(json.dumps(salts))
"""


def test_salt_file_race_between_two_processes(tmp_path: Path) -> None:
    n = 30
    go = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(go), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    first, second = (json.loads(out) for out, _ in outputs)
    assert first == second  # the same salt for every file, whoever created it
    assert all(len(s) == 64 for s in first)  # complete, never an empty or torn read
    for i in range(n):
        assert (tmp_path / f"salt-{i}").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"salt-{i}" for i in range(n))


def test_salt_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        salt = load_salt(None, tmp_path / "caller-salt")
    finally:
        os.umask(old)
    assert (tmp_path / "caller-salt").stat().st_mode & 0o777 == 0o600
    assert load_salt(None, tmp_path / "caller-salt") == salt
    assert load_salt("pepper", tmp_path / "caller-salt") == b"pepper"  # the setting wins


def test_empty_salt_file_left_by_the_old_race_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "caller-salt").write_bytes(b"")
    salt = load_salt(None, tmp_path / "caller-salt")
    assert len(salt) == 64 and load_salt(None, tmp_path / "caller-salt") == salt


def test_replicas_share_the_salt_through_the_database(pg_fresh_dsn: str) -> None:
    with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
        migrations.migrate(conn)

    async def replicas() -> list[bytes]:
        logs = [TurnLog(pg_fresh_dsn) for _ in range(3)]
        for log in logs:
            await log.start()
        try:
            return list(await asyncio.gather(*(log.caller_salt() for log in logs)))
        finally:
            for log in logs:
                await log.close()

    first = asyncio.run(replicas())
    again = asyncio.run(replicas())  # restarted replicas
    assert len(set(first + again)) == 1 and len(first[0]) == 64
    with psycopg.connect(pg_fresh_dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM shared_secrets").fetchone()
    assert rows is not None and rows[0] == 1


def test_incoming_call_hashes_the_caller_with_the_shared_salt(
    pg_fresh_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
        migrations.migrate(conn)
    hashes = []
    for replica in ("a", "b"):  # two replicas, two data dirs, one database
        app = FastAPI()
        settings = Settings(data_dir=tmp_path / replica)
        mount(app, "", settings=settings, backend=backend_of(served_runtime(), pg_fresh_dsn))
        with LiveServer(app) as live:
            form = {"CallSid": "CA1", "From": "+15559998888", "To": "+15550001111"}
            reply = httpx.post(f"{live.http}/telephone/incoming", data=form, timeout=30)
            assert reply.status_code == 200, reply.text
            hashes.append(reply.text)
        assert not (tmp_path / replica / "caller-salt").exists()  # not a file per replica
    with psycopg.connect(pg_fresh_dsn) as conn:
        rows = conn.execute("SELECT value FROM shared_secrets").fetchall()
    # The caller's hash stays on the server with the stream ticket (never in the TwiML): both
    # replicas hashed with the one salt in the database, and neither wrote a salt of its own.
    assert len(rows) == 1
    expected = caller_hash("+15559998888", rows[0][0].encode())
    assert all('name="ticket"' in text and expected not in text for text in hashes)
