"""Versioned SQL migrations: ``NNNN_name.sql`` files beside this module, applied in order.

``migrate(conn)`` is idempotent and safe to run from several processes at once: each pending
file is applied in its own transaction that first takes a transaction-level advisory lock and
re-checks ``schema_migrations``, so two starters never apply the same version twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

logger = logging.getLogger(__name__)

#: pg_advisory_xact_lock key that serializes migrations (any fixed 64-bit number).
ADVISORY_LOCK_KEY = 0x766F_6963_6562_6F74 >> 1  # "voicebot" >> 1, fits a signed bigint

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One SQL file: its version (the number prefix), name and text."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with the package, by ascending version."""
    found: list[Migration] = []
    for entry in resources.files(__name__).iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {__name__}: {versions}")
    return found


def migrate(conn: psycopg.Connection[Any], migrations: list[Migration] | None = None) -> list[int]:
    """Apply the pending migrations; return the versions applied now (empty when up to date).

    Must be given a connection that is not inside a transaction; it is left in the same state.
    """
    pending = available() if migrations is None else migrations
    applied_now: list[int] = []
    for migration in pending:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
            conn.execute(_CREATE_TABLE)
            row = conn.execute(
                "SELECT checksum FROM schema_migrations WHERE version = %s", (migration.version,)
            ).fetchone()
            if row is not None:
                if row[0] != migration.checksum:
                    logger.warning(
                        "migration %04d_%s was edited after it was applied; not re-applying it",
                        migration.version,
                        migration.name,
                    )
                continue
            logger.info("applying migration %04d_%s", migration.version, migration.name)
            # No parameters: psycopg sends the file as one simple query (several statements).
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    return applied_now


def current_version(conn: psycopg.Connection[Any]) -> int | None:
    """The highest applied version, or None when no migration ran yet."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return None if row is None else row[0]
