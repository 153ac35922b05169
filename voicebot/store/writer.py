"""Recording conversations and turns in PostgreSQL, off the audio path, without losing any.

``PostgresTurnStore.record(turn)`` only snapshots the turn into a bounded in-process queue and
returns: it never touches the disk or the network on the caller's thread. A writer thread drains
the queue into PostgreSQL over one connection of its own (reads go through a small pool that
connects only when used). While the database cannot be reached the
writer appends the records to the spool (``voicebot.store.spool``) and replays it once the
database is back. When the queue is full, ``record()`` hands the record to a second bounded
queue that a spooler thread appends to the spool; only when that one is full too is the record
dropped. Inserts are idempotent on the turn id (``ON CONFLICT DO NOTHING``) and conversations
are upserted, so a record replayed twice is stored once.

Every record therefore ends up stored exactly once or counted in ``stats["lost"]`` (turns only;
the ``voicebot_turns_lost_total`` metric), with one error logged per episode of loss: both queues
full, or a spool the disk refuses (full filesystem, quota, file size limit).

A database that is down when the store starts is fine: ``prepare`` (e.g. the migrations) runs on
the writer thread before the first write and again until it succeeds.

What can still be lost uncounted: records that sit in the in-process queues when the process is
killed with SIGKILL (normally milliseconds' worth; up to one connect timeout while the database
is becoming unreachable). ``close()`` and interpreter exit drain the queues or spool them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from voicebot.conversation import Conversation, Turn
from voicebot.errors import StageError
from voicebot.store.queries import ConversationSummary, get_stored_turns, list_conversations
from voicebot.store.records import (
    Record,
    apply,
    conversation_end_record,
    conversation_record,
    sql_params,
    turn_record,
)
from voicebot.store.spool import Spool

logger = logging.getLogger(__name__)


class TurnStore(Protocol):
    """Where conversations and turns are recorded; the pipeline only ever sees this."""

    def open_conversation(self, conversation: Conversation) -> None:
        """Record that a conversation started. Never blocks, never raises."""
        ...

    def record(self, turn: Turn) -> None:
        """Record one finished turn. Never blocks, never raises."""
        ...

    def close_conversation(self, conversation_id: UUID, ended_at: datetime) -> None:
        """Record that a conversation ended. Never blocks, never raises."""
        ...

    def recent_turns(self, conversation_id: UUID, limit: int) -> list[Turn]:
        """The last ``limit`` turns of a conversation, oldest first (to resume it).

        Raises StageError("store", ...) when the database cannot answer.
        """
        ...


_WAKE: Record = {"kind": "wake"}
"""Put on the queues by close() to wake the writer and the spooler; never written."""

_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError)

SPOOL_LOG_INTERVAL_S = 60.0
"""A spool failure (or a full queue) is logged again only after this long."""


class PostgresTurnStore:
    """TurnStore writing behind the caller into PostgreSQL, spooling while it is unreachable.

    ``pool_or_dsn``: a psycopg_pool ``ConnectionPool`` (not closed by us) or a DSN (the writer
    keeps one connection; reads use a pool we create and close). ``overflow_size``: how many
    records may wait for the spooler when the queue is full. ``prepare``: run (on the writer
    thread) before the first write, until it succeeds, e.g. the migrations of a database that
    was down at start (``known_down``: that outage was logged already). Call ``start()`` once,
    ``close(timeout_s)`` at the end (or use ``with``).
    """

    def __init__(
        self,
        pool_or_dsn: ConnectionPool[Any] | str,
        spool_path: Path,
        queue_size: int = 1000,
        *,
        overflow_size: int = 10_000,
        connect_timeout_s: float = 2.0,
        batch_size: int = 200,
        retry_min_s: float = 0.5,
        retry_max_s: float = 5.0,
        prepare: Callable[[], object] | None = None,
        database_name: str = "the database",
        known_down: bool = False,
    ) -> None:
        self.dsn = pool_or_dsn if isinstance(pool_or_dsn, str) else None
        """The DSN the store was given (None when given a pool)."""
        if isinstance(pool_or_dsn, str):
            self._pool: ConnectionPool[Any] = ConnectionPool(
                pool_or_dsn,
                min_size=0,  # reads only: no background connecting (nor its logs) during an outage
                max_size=2,
                open=False,
                kwargs={
                    "connect_timeout": max(2, round(connect_timeout_s)),
                    "application_name": "voicebot-store",
                },
                check=ConnectionPool.check_connection,
                timeout=connect_timeout_s,
                reconnect_timeout=5.0,
                name="voicebot-store",
            )
            self._owns_pool = True
        else:
            self._pool = pool_or_dsn
            self._owns_pool = False
        self._writer_conn: psycopg.Connection[Any] | None = None
        self.spool = Spool(spool_path)
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=max(1, queue_size))
        self._overflow: queue.Queue[Record] = queue.Queue(maxsize=max(1, overflow_size))
        self._timeout_s = connect_timeout_s
        self._batch_size = batch_size
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._prepare = prepare
        self._prepared = prepare is None
        self._database_name = database_name
        self._closing = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._spooler: threading.Thread | None = None
        self._inflight: list[Record] = []
        self._inflight_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._db_down = known_down  # the writer's view, for logging each outage once
        self._queue_full = False  # set by callers when the queue overflows; the spooler logs
        self._queue_full_logged_at = float("-inf")
        self._spool_failed_at = float("-inf")  # for logging each episode of loss once
        self._overflow_full = False  # set by callers when the overflow is full too
        self._overflow_full_logged_at = float("-inf")
        self._spool_dirty = False  # set by whoever appends to the spool; the writer replays it
        self.stats = {"written": 0, "spooled": 0, "replayed": 0, "rejected": 0, "lost": 0}
        """Counters since start: records written, spooled, replayed from the spool, rejected
        (set aside in the ``.rejected`` file); ``lost``: turns neither stored nor spooled."""

    # -- lifecycle

    def start(self) -> PostgresTurnStore:
        """Open the pool (without waiting for the database) and start the writer thread."""
        if self._thread is not None:
            return self
        if self._owns_pool:
            self._pool.open(wait=False)
        self._thread = threading.Thread(target=self._run, name="voicebot-store", daemon=True)
        self._thread.start()
        self._spooler = threading.Thread(
            target=self._run_spooler, name="voicebot-spooler", daemon=True
        )
        self._spooler.start()
        atexit.register(self._at_exit)
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Drain the queue into the database within ``timeout_s``; spool whatever is left."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        self._closing.set()
        deadline = time.monotonic() + timeout_s
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_WAKE)  # wake an idle writer now
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                with self._inflight_lock:
                    inflight = list(self._inflight)  # may also commit later: replays are idempotent
                leftover = [r for r in inflight + self._take_all(self._queue) if r is not _WAKE]
                logger.warning(
                    "store writer did not finish within %.1f s; spooling %d records",
                    timeout_s,
                    len(leftover),
                )
                self._spool(leftover)
        # Whatever the writer left (none unless it died): spooled, or counted as lost.
        self._spool([r for r in self._take_all(self._queue) if r is not _WAKE])
        if self._spooler is not None:
            with contextlib.suppress(queue.Full):
                self._overflow.put_nowait(_WAKE)  # wake an idle spooler now
            self._spooler.join(max(1.0, deadline - time.monotonic()))
        self._spool([r for r in self._take_all(self._overflow) if r is not _WAKE])
        if self._owns_pool:
            try:
                self._pool.close(timeout=1.0)
            except Exception:
                logger.debug("closing the store pool failed", exc_info=True)
        if self._writer_conn is not None and not (self._thread and self._thread.is_alive()):
            with contextlib.suppress(Exception):
                self._writer_conn.close()

    def __enter__(self) -> PostgresTurnStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _at_exit(self) -> None:
        self.close(timeout_s=2.0)

    # -- TurnStore

    def open_conversation(self, conversation: Conversation) -> None:
        self._submit(conversation_record, conversation)

    def record(self, turn: Turn) -> None:
        self._submit(turn_record, turn)

    def close_conversation(self, conversation_id: UUID, ended_at: datetime) -> None:
        try:
            self._enqueue(conversation_end_record(conversation_id, ended_at))
        except Exception:
            logger.exception("could not record the end of conversation %s", conversation_id)

    def recent_turns(self, conversation_id: UUID, limit: int) -> list[Turn]:
        try:
            with self._pool.connection(timeout=self._timeout_s) as conn:
                return [s.turn for s in get_stored_turns(conn, conversation_id, limit)]
        except psycopg.Error as e:
            raise StageError("store", f"cannot load conversation {conversation_id}: {e}") from e

    def conversations(self, limit: int = 20) -> list[ConversationSummary]:
        """The latest conversations, newest first (blocking: call it off the event loop)."""
        try:
            with self._pool.connection(timeout=self._timeout_s) as conn:
                return list_conversations(conn, limit)
        except psycopg.Error as e:
            raise StageError("store", f"cannot list conversations: {e}") from e

    # -- status

    @property
    def lost_turns(self) -> int:
        """Turns neither stored nor spooled since start (``voicebot_turns_lost_total``)."""
        return self.stats["lost"]

    def pending(self) -> int:
        """Records not yet written nor spooled (queued or being written)."""
        return self._queue.unfinished_tasks + self._overflow.unfinished_tasks

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record submitted so far is written or spooled; False on timeout."""
        deadline = time.monotonic() + timeout_s
        for waiting in (self._queue, self._overflow, self._queue):
            with waiting.all_tasks_done:
                while waiting.unfinished_tasks:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    waiting.all_tasks_done.wait(remaining)
        return True

    # -- the caller's side: snapshot and hand over; never the disk, never the network

    def _submit(self, to_record: Callable[[Any], Record], item: Any) -> None:
        try:
            self._enqueue(to_record(item))
        except Exception:
            logger.exception("could not record %s", type(item).__name__)

    def _enqueue(self, record: Record) -> None:
        if self._closed or self._thread is None:
            self._spool([record])  # no thread to hand it to: not started, or closed
            return
        try:
            self._queue.put_nowait(record)
            return
        except queue.Full:
            pass
        self._queue_full = True  # logged by the spooler: no I/O on the caller's thread
        try:
            self._overflow.put_nowait(record)
        except queue.Full:
            if record.get("kind") == "turn":
                self._count("lost", 1)
            self._overflow_full = True

    @staticmethod
    def _take_all(source: queue.Queue[Record], limit: int | None = None) -> list[Record]:
        items: list[Record] = []
        while limit is None or len(items) < limit:
            try:
                items.append(source.get_nowait())
            except queue.Empty:
                break
            source.task_done()
        return items

    def _report_overflow(self) -> None:
        """Log what the callers' side flagged, on the spooler's thread, at most once a minute
        per kind (a queue that stays full would otherwise log every turn)."""
        now = time.monotonic()
        if self._queue_full:
            self._queue_full = False
            if now - self._queue_full_logged_at > SPOOL_LOG_INTERVAL_S:
                self._queue_full_logged_at = now
                logger.warning("store queue full; spooling records until the writer catches up")
        if self._overflow_full:
            self._overflow_full = False
            if now - self._overflow_full_logged_at > SPOOL_LOG_INTERVAL_S:
                self._overflow_full_logged_at = now
                logger.error(
                    "the store queue and the spool queue are both full: %d turns lost so far"
                    " (voicebot_turns_lost_total); the disk or the database cannot keep up",
                    self.stats["lost"],
                )

    def _spool(self, records: Sequence[Record]) -> None:
        """Append to the spool (on the writer's or the spooler's thread, or at close)."""
        if not records:
            return
        try:
            self.spool.append(records)
        except Exception as e:
            turns = sum(1 for r in records if r.get("kind") == "turn")
            self._count("lost", turns)
            # One line per episode: a disk that is full stays full for a while, and a small
            # batch squeezing in between two refused ones does not end the episode. The writer
            # and the spooler both spool, so the episode is decided under a lock.
            with self._stats_lock:
                now = time.monotonic()
                first_of_episode = now - self._spool_failed_at > SPOOL_LOG_INTERVAL_S
                self._spool_failed_at = now
            if first_of_episode:
                logger.error(
                    "cannot write the spool %s (%s): %d turns lost so far; further losses are"
                    " counted in voicebot_turns_lost_total",
                    self.spool.path,
                    e,
                    self.stats["lost"],
                )
            return
        self._spool_dirty = True
        self._count("spooled", len(records))

    def _count(self, name: str, n: int) -> None:
        with self._stats_lock:
            self.stats[name] += n

    # -- the spooler thread: the overflow of the queue, to disk

    def _run_spooler(self) -> None:
        while True:
            try:
                first = self._overflow.get(timeout=0.05 if self._closing.is_set() else 0.5)
            except queue.Empty:
                if self._closing.is_set():
                    self._report_overflow()
                    return
                continue
            self._report_overflow()
            taken = [first]
            while len(taken) < self._batch_size:
                try:
                    taken.append(self._overflow.get_nowait())
                except queue.Empty:
                    break
            try:
                self._spool([r for r in taken if r is not _WAKE])
            finally:
                for _ in taken:
                    self._overflow.task_done()

    # -- the writer thread

    def _run(self) -> None:
        retry_at = 0.0  # monotonic time before which the database is not tried again
        backoff = self._retry_min_s
        self._spool_dirty = self.spool.pending()
        while True:
            closing = self._closing.is_set()
            try:
                first = self._queue.get(timeout=0.05 if closing else 0.5)
                taken = [first, *self._drain_queue(self._batch_size - 1)]
            except queue.Empty:
                taken = []
            batch = [r for r in taken if r is not _WAKE]
            with self._inflight_lock:
                self._inflight = batch
            try:
                db_ok = time.monotonic() >= retry_at
                if db_ok and not self._prepared:
                    db_ok = self._run_prepare()
                if db_ok and self._spool_dirty:
                    self._spool_dirty = False  # before: the spooler may set it again meanwhile
                    db_ok = self._replay()
                    if not db_ok:
                        self._spool_dirty = True
                if batch and db_ok:
                    db_ok = self._write(batch)
                    if not db_ok:
                        self._spool(batch)
                elif batch:
                    self._spool(batch)
                if db_ok:
                    backoff = self._retry_min_s
                elif time.monotonic() >= retry_at:
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, self._retry_max_s)
            except Exception:
                logger.exception("store writer failed; spooling %d records", len(batch))
                self._spool(batch)
            finally:
                with self._inflight_lock:
                    self._inflight = []
                for _ in taken:
                    self._queue.task_done()
            if closing and not batch and self._queue.empty():
                return

    def _drain_queue(self, limit: int) -> list[Record]:
        items: list[Record] = []
        while len(items) < limit:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _database_down(self, error: Exception) -> None:
        if not self._db_down:
            self._db_down = True
            logger.warning(
                "%s is unreachable (%s); spooling turns to %s until it is back",
                self._database_name,
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
                self.spool.path,
            )

    def _database_up(self) -> None:
        if self._db_down:
            self._db_down = False
            logger.warning("%s is reachable again; replaying the spool", self._database_name)

    def _run_prepare(self) -> bool:
        assert self._prepare is not None
        try:
            self._prepare()
        except Exception as e:
            self._database_down(e)
            return False
        self._prepared = True
        self._database_up()
        return True

    def _write(self, records: Sequence[Record]) -> bool:
        """Write records in one transaction; False when the database is unreachable.

        A record the database refuses (bad data) is retried alone, then set aside in the
        ``.rejected`` file next to the spool so that it neither blocks the rest nor vanishes.
        """
        valid: list[Record] = []
        for record in records:
            try:
                sql_params(record)
                valid.append(record)
            except (ValueError, KeyError, TypeError) as e:
                self._reject(record, e)
        records = valid
        try:
            with self._connection() as conn:
                try:
                    # Pipelined: one round trip per batch, not two per record (a remote server).
                    with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                        for record in records:
                            apply(cur, record)
                except _UNREACHABLE:
                    raise
                except psycopg.Error:
                    for record in records:
                        try:
                            with conn.transaction(), conn.cursor() as cur:
                                apply(cur, record)
                        except _UNREACHABLE:
                            raise
                        except psycopg.Error as e:
                            self._reject(record, e)
        except _UNREACHABLE as e:
            self._database_down(e)
            return False
        self._database_up()
        self._count("written", len(records))
        return True

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The writer's connection: its own (reconnected after a failure), or the given pool's."""
        if not self._owns_pool:
            with self._pool.connection(timeout=self._timeout_s) as pooled:
                yield pooled
            return
        conn = self._writer_conn
        if conn is None or conn.closed or conn.broken:
            assert self.dsn is not None
            conn = psycopg.connect(
                self.dsn,
                connect_timeout=max(2, round(self._timeout_s)),
                application_name="voicebot-store",
            )
            self._writer_conn = conn
        try:
            yield conn
        except _UNREACHABLE:
            self._writer_conn = None
            with contextlib.suppress(Exception):
                conn.close()
            raise

    def _replay(self) -> bool:
        """Replay every spool file into the database; False when it became unreachable.

        A file another process is replaying right now is left to it.
        """
        for path in self.spool.take():
            with Spool.claim(path) as records:
                if records is None:
                    continue
                for start in range(0, len(records), self._batch_size):
                    if not self._write(records[start : start + self._batch_size]):
                        return False
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._count("replayed", len(records))
            if records:
                logger.info("replayed %d spooled records from %s", len(records), path.name)
        return True

    def _reject(self, record: Record, error: Exception) -> None:
        logger.error("database refused a %s record (%s); set aside", record.get("kind"), error)
        self._count("rejected", 1)
        path = self.spool.path.with_name(self.spool.path.name + ".rejected")
        try:
            Spool(path).append([record | {"rejected_because": str(error)}])
        except OSError:
            logger.exception("cannot write %s", path)


class InMemoryTurnStore:
    """A TurnStore that keeps everything in lists: for tests and ``--no-db`` runs."""

    def __init__(self) -> None:
        self.conversations: dict[UUID, Conversation] = {}
        self.ended: dict[UUID, datetime] = {}
        self.turns: list[Turn] = []

    def open_conversation(self, conversation: Conversation) -> None:
        self.conversations[conversation.conversation_id] = conversation

    def record(self, turn: Turn) -> None:
        if all(t.turn_id != turn.turn_id for t in self.turns):
            self.turns.append(turn)

    def close_conversation(self, conversation_id: UUID, ended_at: datetime) -> None:
        self.ended[conversation_id] = ended_at

    def recent_turns(self, conversation_id: UUID, limit: int) -> list[Turn]:
        mine = sorted(
            (t for t in self.turns if t.conversation_id == conversation_id),
            key=lambda t: t.sequence,
        )
        return mine[-limit:] if limit > 0 else []
