"""The database lifecycle and migrations, against real embedded PostgreSQL servers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg import conninfo
from pydantic import SecretStr

from tests import conftest as _conftest
from voicebot import migrations
from voicebot.database import Database, mask_dsn, start_database
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
    assert sorted(v for versions in applied for v in versions) == [
        m.version for m in migrations.available()
    ]


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
