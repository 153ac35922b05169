"""The database lifecycle and migrations, against real embedded PostgreSQL servers."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
from psycopg import conninfo, sql
from pydantic import SecretStr

from tests import conftest as _conftest
from voicebot import migrations
from voicebot.database import Database, DatabaseUnreachable, mask_dsn, start_database
from voicebot.errors import ConfigError
from voicebot.settings import Settings

if not hasattr(_conftest, "pg_database"):  # until conftest imports tests.pg_fixtures
    from tests.pg_fixtures import *  # noqa: F403


def test_embedded_server_started_and_migrated(pg_database: Database) -> None:
    assert pg_database.embedded
    assert pg_database.start_s is not None
    print(f"\nembedded PostgreSQL start: {pg_database.start_s:.2f} s (initdb + start)")
    with pg_database.connect() as conn:
        assert migrations.current_version(conn) == migrations.available()[-1].version
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables").fetchall()}
    assert {"conversations", "turns", "schema_migrations"} <= tables


def test_migrations_are_idempotent(pg_fresh_dsn: str) -> None:
    with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
        assert migrations.current_version(conn) is None
        assert migrations.migrate(conn) == [m.version for m in migrations.available()]
        assert migrations.migrate(conn) == []
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert rows[:3] == [(1, "init"), (2, "llm_first_chunk"), (3, "reservations_tool_calls")]
    assert rows == [(m.version, m.name) for m in migrations.available()]


def test_concurrent_migrations_apply_once(pg_fresh_dsn: str) -> None:
    applied: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
                barrier.wait()
                applied.append(migrations.migrate(conn))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # each version exactly once, whichever runner got to it (each file is its own transaction)
    every = [m.version for m in migrations.available()]
    assert sorted(v for versions in applied for v in versions) == every


def test_unreachable_dsn_is_one_clear_config_error(tmp_path) -> None:
    settings = Settings(
        data_dir=tmp_path, database_url=SecretStr("postgresql://bot:s3cret@127.0.0.1:1/voicebot")
    )
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        start_database(settings)
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    assert "VOICEBOT_DATABASE_URL" in message
    assert "s3cret" not in message
    assert "bot:***@127.0.0.1:1" in message
    assert info.value.__cause__ is None  # the psycopg error (with the DSN) is not chained
    assert elapsed < 10


def test_wrong_database_is_config_error(pg_dsn: str, tmp_path) -> None:
    wrong = conninfo.make_conninfo(pg_dsn, dbname="no_such_db", password="s3cret")
    settings = Settings(data_dir=tmp_path, database_url=SecretStr(wrong))
    with pytest.raises(ConfigError) as info:
        start_database(settings)
    assert "VOICEBOT_DATABASE_URL" in str(info.value)
    assert "no_such_db" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_malformed_dsn_is_config_error(tmp_path) -> None:
    settings = Settings(
        data_dir=tmp_path, database_url=SecretStr("postgresql://u:s3cret@host:notaport/db")
    )
    with pytest.raises(ConfigError) as info:
        start_database(settings)
    assert "VOICEBOT_DATABASE_URL" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_external_dsn_is_used_and_migrated(pg_fresh_dsn: str, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=SecretStr(pg_fresh_dsn))
    database = start_database(settings)
    try:
        assert not database.embedded and database.dsn == pg_fresh_dsn
        with database.connect() as conn:
            assert migrations.current_version(conn) == migrations.available()[-1].version
    finally:
        database.stop()
    assert not (tmp_path / "postgres").exists()  # no embedded server was started


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://bot:s3cret@db:5432/voicebot", "postgresql://bot:***@db:5432/voicebot"),
        ("postgres://bot@db/voicebot", "postgres://bot@db/voicebot"),
        (
            "postgresql:///voicebot?host=/tmp&password=s3cret",
            "postgresql:///voicebot?host=/tmp&password=***",
        ),
        ("host=db user=bot password=s3cret dbname=v", "host=db user=bot password=*** dbname=v"),
        ("host=db password = 'se cret' dbname=v", "host=db password = *** dbname=v"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


_ATTACH = """
import sys
from pathlib import Path
from voicebot.database import start_database
from voicebot.settings import Settings
db = start_database(Settings(data_dir=Path(sys.argv[1]), database_url=None))
with db.connect() as conn:
    pid = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
print(db.start_s, pid, flush=True)
db.stop()
"""


def test_second_process_attaches_to_running_server(pg_database: Database) -> None:
    assert pg_database.data_dir is not None
    with pg_database.connect() as conn:
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    out = subprocess.run(
        [sys.executable, "-c", _ATTACH, str(pg_database.data_dir.parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split(maxsplit=1)
    assert out[0] == "None"  # attached, did not start a server
    assert out[1].strip() == str(started)
    # The child's exit did not stop the server this process still uses.
    with pg_database.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- an external server that is down at start --------------------------------------------------


def test_unreachable_server_is_tolerated_when_asked_and_logged_once(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="voicebot")
    dsn = "postgresql://bot:s3cret@127.0.0.1:1/voicebot"
    settings = Settings(data_dir=tmp_path, database_url=SecretStr(dsn))
    with pytest.raises(DatabaseUnreachable):  # the CLI's commands still need it now
        start_database(settings)
    caplog.clear()
    database = start_database(settings, allow_unreachable=True)
    try:
        assert not database.ready and not database.embedded
    finally:
        database.stop()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "starting anyway" in said[0] and "bot:***@127.0.0.1:1" in said[0]
    assert "s3cret" not in said[0]


def test_wrong_dsn_is_never_tolerated(pg_dsn: str, pg_conn, tmp_path) -> None:
    for wrong in (
        conninfo.make_conninfo(pg_dsn, dbname="no_such_db"),
        conninfo.make_conninfo(pg_dsn, user="no_such_role"),
        "postgresql://u:s3cret@host:notaport/db",
    ):
        settings = Settings(data_dir=tmp_path, database_url=SecretStr(wrong))
        with pytest.raises(ConfigError) as info:
            start_database(settings, allow_unreachable=True)
        assert not isinstance(info.value, DatabaseUnreachable), wrong
        assert "VOICEBOT_DATABASE_URL" in str(info.value)


def stored(dsn: str, conversation_id: uuid.UUID) -> int:
    """Turns stored so far; 0 while the schema does not exist yet."""
    try:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM turns WHERE conversation_id = %s", (conversation_id,)
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return 0 if row is None else row[0]


def test_store_starts_with_the_server_down_then_migrates_and_replays(
    pg_restartable, tmp_path, caplog
) -> None:
    """The service's turn store (what ``serve``/``ui``/``simulate`` open) with an external
    server that is down: it starts, spools, and once the server is back it migrates the empty
    database and stores every turn exactly once; one line says it is down, one that it is back."""
    from tests.test_store import count_turns, make_turn, new_conversation, wait_for
    from voicebot.app import open_turn_store

    caplog.set_level(logging.INFO, logger="voicebot")
    server = pg_restartable
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = conninfo.make_conninfo(server.dsn, dbname=name)
    server.stop()
    conversation = new_conversation()
    cid = conversation.conversation_id
    settings = Settings(data_dir=tmp_path, database_url=SecretStr(dsn))
    try:
        with open_turn_store(settings) as store:
            store.open_conversation(conversation)
            for seq in range(1, 6):
                store.record(make_turn(cid, seq))
            assert store.flush(10)
            time.sleep(1.5)  # a few retries while it is down: still one line
            server.start()
            for seq in range(6, 9):
                store.record(make_turn(cid, seq))
            assert wait_for(lambda: stored(dsn, cid) >= 8, timeout_s=30)
        with psycopg.connect(dsn) as conn:
            assert migrations.current_version(conn) == migrations.available()[-1].version
        assert count_turns(dsn, cid) == (8, 8)
    finally:
        server.start()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    down = [m for m in warnings if "starting anyway" in m or "unreachable" in m]
    back = [m for m in warnings if "reachable again" in m]
    assert len(down) == 1, warnings
    assert len(back) == 1, warnings
