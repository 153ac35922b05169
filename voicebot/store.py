"""Recording conversations and turns in PostgreSQL, off the audio path, without losing any.

``PostgresTurnStore.record(turn)`` only snapshots the turn into a bounded in-process queue; a
writer thread drains it into PostgreSQL through a psycopg_pool pool. When the database cannot be
reached the writer appends the records to a local spool file (JSON lines, fsynced) and replays it
once the database is back; when the queue is full ``record()`` spools directly. Inserts are
idempotent on the turn id (``ON CONFLICT DO NOTHING``) and conversations are upserted, so a record
replayed twice is stored once. Each newly inserted turn sends ``pg_notify('voicebot_turns',
{"conversation_id", "turn_id", "sequence"})`` in the same transaction; ``follow_turns()`` turns
those notifications back into ``Turn`` objects for live transcripts in another process.

What can still be lost: records that sit in the in-process queue when the process is killed
with SIGKILL (normally milliseconds' worth; up to one connect timeout while the database is
becoming unreachable). ``close()`` and interpreter exit drain the queue or spool it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from voicebot.conversation import (
    TIMING_FIELDS,
    Channel,
    Conversation,
    Timings,
    ToolCallRecord,
    Turn,
    utc_now,
)
from voicebot.errors import StageError

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "voicebot_turns"
"""The LISTEN/NOTIFY channel every inserted turn is announced on."""

Record = dict[str, Any]
"""A JSON-ready record: ``{"kind": "conversation" | "conversation_end" | "turn", ...}``."""

_TIMING_FIELDS = TIMING_FIELDS
_CHANNELS = ("web", "phone", "api", "simulate")


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


@dataclass(frozen=True)
class StoredTurn:
    """A turn as read back from the database, with the time its row was written."""

    turn: Turn
    created_at: datetime


@dataclass(frozen=True)
class ConversationSummary:
    """One row of ``list_conversations``: persona/channel are None for a conversation whose own
    record has not arrived yet (only its turns did)."""

    conversation_id: UUID
    persona: str | None
    channel: Channel | None
    started_at: datetime
    ended_at: datetime | None
    caller_ref: str | None
    turns: int


# --- records: the one serialized form, used by the queue, the spool and the SQL parameters ---


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dt(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def conversation_record(conversation: Conversation) -> Record:
    return {
        "kind": "conversation",
        "id": str(conversation.conversation_id),
        "persona": conversation.persona,
        "channel": conversation.channel,
        "caller_ref": conversation.caller_ref,
        "started_at": _iso(conversation.started_at),
    }


def conversation_end_record(conversation_id: UUID, ended_at: datetime) -> Record:
    return {"kind": "conversation_end", "id": str(conversation_id), "ended_at": _iso(ended_at)}


def _ms(value: float | None) -> float | None:
    return None if value is None else float(value)  # numpy scalars are not JSON


def _opt_str(value: str | None) -> str | None:
    return None if value is None else str(value)


def turn_record(turn: Turn) -> Record:
    """A snapshot of the turn (later changes to the object do not affect what is stored)."""
    t = turn.timings
    return {
        "kind": "turn",
        "id": str(turn.turn_id),
        "conversation_id": str(turn.conversation_id),
        "seq": int(turn.sequence),
        "user_text": str(turn.user_text),
        "assistant_text": str(turn.assistant_text),
        "interrupted": bool(turn.interrupted),
        "error": _opt_str(turn.error),
        "endpoint_ms": _ms(t.endpoint_ms),
        "stt_ms": _ms(t.stt_ms),
        "llm_ttft_ms": _ms(t.llm_ttft_ms),
        "llm_first_chunk_ms": _ms(t.llm_first_chunk_ms),
        "tts_first_ms": _ms(t.tts_first_ms),
        "v2v_ms": _ms(t.v2v_ms),
        "bargein_stop_ms": _ms(t.bargein_stop_ms),
        "stt_model": _opt_str(turn.stt_model),
        "llm_model": _opt_str(turn.llm_model),
        "tts_model": _opt_str(turn.tts_model),
        "started_at": _iso(turn.started_at),
        "ended_at": _iso(turn.ended_at),
        "tool_calls": [tool_call_json(c) for c in turn.tool_calls],
    }


def tool_call_json(call: ToolCallRecord) -> dict[str, Any]:
    """One tool call as stored in ``turns.tool_calls`` (jsonb) and spooled."""
    return {
        "name": call.name,
        "arguments": call.arguments,
        "result": call.result,
        "tool_ms": _ms(call.tool_ms),
        "error": call.error,
    }


def _tool_calls(value: Any) -> list[ToolCallRecord]:
    return [
        ToolCallRecord(
            name=str(c["name"]),
            arguments=dict(c.get("arguments") or {}),
            result=str(c.get("result") or ""),
            tool_ms=None if c.get("tool_ms") is None else float(c["tool_ms"]),
            error=c.get("error"),
        )
        for c in value or []
    ]


def _sql_params(record: Record) -> Record:
    """Validate a (possibly spooled) record and convert it to typed SQL parameters.

    Raises KeyError/ValueError/TypeError for a record that is not one of ours.
    """
    kind = record["kind"]
    params: Record = {"id": UUID(str(record["id"]))}
    if kind == "conversation":
        channel = record["channel"]
        if channel not in _CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        params |= {
            "persona": str(record["persona"]),
            "channel": channel,
            "caller_ref": record.get("caller_ref"),
            "started_at": _dt(record["started_at"]),
        }
    elif kind == "conversation_end":
        params["ended_at"] = _dt(record["ended_at"])
    elif kind == "turn":
        params |= {
            "conversation_id": UUID(str(record["conversation_id"])),
            "seq": int(record["seq"]),
            "user_text": str(record["user_text"]),
            "assistant_text": str(record.get("assistant_text") or ""),
            "interrupted": bool(record.get("interrupted", False)),
            "error": record.get("error"),
            "stt_model": record.get("stt_model"),
            "llm_model": record.get("llm_model"),
            "tts_model": record.get("tts_model"),
            "started_at": _dt(record["started_at"]),
            "ended_at": _dt(record.get("ended_at")),
            "tool_calls": Jsonb([tool_call_json(c) for c in _tool_calls(record.get("tool_calls"))]),
        }
        for name in _TIMING_FIELDS:
            value = record.get(name)
            params[name] = None if value is None else float(value)
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return params


_UPSERT_CONVERSATION = """
INSERT INTO conversations (id, persona, channel, caller_ref, started_at)
VALUES (%(id)s, %(persona)s, %(channel)s, %(caller_ref)s, %(started_at)s)
ON CONFLICT (id) DO UPDATE SET
    persona = EXCLUDED.persona,
    channel = EXCLUDED.channel,
    caller_ref = EXCLUDED.caller_ref,
    started_at = EXCLUDED.started_at
"""

_END_CONVERSATION = """
INSERT INTO conversations (id, started_at, ended_at)
VALUES (%(id)s, %(ended_at)s, %(ended_at)s)
ON CONFLICT (id) DO UPDATE SET ended_at = EXCLUDED.ended_at
"""

# A turn may reach the database before its conversation record (spool replays are not ordered
# with the queue): insert a stub the conversation record later completes.
_STUB_CONVERSATION = """
INSERT INTO conversations (id, started_at) VALUES (%(conversation_id)s, %(started_at)s)
ON CONFLICT (id) DO NOTHING
"""

_INSERT_TURN = """
WITH inserted AS (
    INSERT INTO turns (
        id, conversation_id, seq, user_text, assistant_text, interrupted, error,
        endpoint_ms, stt_ms, llm_ttft_ms, llm_first_chunk_ms, tts_first_ms, v2v_ms,
        bargein_stop_ms, stt_model, llm_model, tts_model, started_at, ended_at, tool_calls
    ) VALUES (
        %(id)s, %(conversation_id)s, %(seq)s, %(user_text)s, %(assistant_text)s,
        %(interrupted)s, %(error)s, %(endpoint_ms)s, %(stt_ms)s, %(llm_ttft_ms)s,
        %(llm_first_chunk_ms)s, %(tts_first_ms)s, %(v2v_ms)s, %(bargein_stop_ms)s,
        %(stt_model)s, %(llm_model)s, %(tts_model)s, %(started_at)s, %(ended_at)s, %(tool_calls)s
    )
    ON CONFLICT (id) DO NOTHING
    RETURNING id, conversation_id, seq
)
SELECT pg_notify(
    %(channel)s,
    json_build_object('conversation_id', conversation_id, 'turn_id', id, 'sequence', seq)::text
) FROM inserted
"""


def _apply(cur: psycopg.Cursor[Any], record: Record) -> None:
    params = _sql_params(record)
    kind = record["kind"]
    if kind == "conversation":
        cur.execute(_UPSERT_CONVERSATION, params)
    elif kind == "conversation_end":
        cur.execute(_END_CONVERSATION, params)
    else:
        cur.execute(_STUB_CONVERSATION, params)
        cur.execute(_INSERT_TURN, params | {"channel": NOTIFY_CHANNEL})


# --- the spool ---------------------------------------------------------------------------------


class Spool:
    """An append-only JSON-lines file of records waiting for the database, safe across threads
    and processes (flock). Replays take the file away by renaming it, so appends never wait for
    the database and a crash during a replay leaves a ``*.replay`` file that the next replay
    picks up (records are idempotent, so replaying one twice is harmless)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        """Append and fsync. Raises OSError when the disk refuses."""
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:
                        current = False
                    if not current:  # renamed away by a replay between open and flock
                        continue
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        data = b"\n" + data  # a previous writer died mid-line: keep lines apart
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                    if size == 0:
                        _fsync_dir(self.path.parent)
                    return
                finally:
                    os.close(fd)

    def pending(self) -> bool:
        """Whether any record waits in the spool (or in an unfinished replay)."""
        try:
            if self.path.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
        return bool(self._replay_files())

    def take(self) -> list[Path]:
        """Move the current spool aside and return every file awaiting replay, oldest first."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if (
                        os.fstat(fd).st_size > 0
                        and os.stat(self.path).st_ino == os.fstat(fd).st_ino
                    ):
                        stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
                        os.rename(
                            self.path, self.path.with_name(f"{self.path.name}.{stamp}.replay")
                        )
                except FileNotFoundError:
                    pass
                finally:
                    os.close(fd)
        return self._replay_files()

    def _replay_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.*.replay"))

    @staticmethod
    def read(path: Path) -> list[Record]:
        """The valid records of one spool file; corrupted lines are skipped with a warning."""
        records: list[Record] = []
        try:
            raw = path.read_bytes()
        except FileNotFoundError:  # another process replayed it meanwhile
            return records
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                _sql_params(record)
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("skipping corrupted spool line %s:%d (%s)", path, number, e)
                continue
            records.append(record)
        return records


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- the store ---------------------------------------------------------------------------------

_WAKE: Record = {"kind": "wake"}
"""Put on the queue by close() to wake the writer; never written."""


class PostgresTurnStore:
    """TurnStore writing behind the caller into PostgreSQL, spooling while it is unreachable.

    ``pool_or_dsn``: a psycopg_pool ``ConnectionPool`` (not closed by us) or a DSN (we create and
    close the pool). Call ``start()`` once, ``close(timeout_s)`` at the end (or use ``with``).
    """

    def __init__(
        self,
        pool_or_dsn: ConnectionPool[Any] | str,
        spool_path: Path,
        queue_size: int = 1000,
        *,
        connect_timeout_s: float = 2.0,
        batch_size: int = 200,
        retry_min_s: float = 0.5,
        retry_max_s: float = 5.0,
    ) -> None:
        if isinstance(pool_or_dsn, str):
            self._pool: ConnectionPool[Any] = ConnectionPool(
                pool_or_dsn,
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"connect_timeout": max(2, round(connect_timeout_s))},
                check=ConnectionPool.check_connection,
                timeout=connect_timeout_s,
                reconnect_timeout=5.0,
                name="voicebot-store",
            )
            self._owns_pool = True
        else:
            self._pool = pool_or_dsn
            self._owns_pool = False
        self.spool = Spool(spool_path)
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=max(1, queue_size))
        self._timeout_s = connect_timeout_s
        self._batch_size = batch_size
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._closing = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._inflight: list[Record] = []
        self._inflight_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = {"written": 0, "spooled": 0, "replayed": 0, "rejected": 0}
        """Counters since start: records written, spooled, replayed from the spool, rejected."""

    # -- lifecycle

    def start(self) -> PostgresTurnStore:
        """Open the pool (without waiting for the database) and start the writer thread."""
        if self._thread is not None:
            return self
        if self._owns_pool:
            self._pool.open(wait=False)
        self._thread = threading.Thread(target=self._run, name="voicebot-store", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Drain the queue into the database within ``timeout_s``; spool whatever is left."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        self._closing.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_WAKE)  # wake an idle writer now
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                with self._inflight_lock:
                    inflight = list(self._inflight)  # may also commit later: replays are idempotent
                queued = self._drain_queue()
                leftover = [r for r in inflight + queued if r is not _WAKE]
                logger.warning(
                    "store writer did not finish within %.1f s; spooling %d records",
                    timeout_s,
                    len(leftover),
                )
                self._spool(leftover)
                for _ in queued:
                    self._queue.task_done()
        else:
            queued = self._drain_queue()
            self._spool(queued)
            for _ in queued:
                self._queue.task_done()
        if self._owns_pool:
            try:
                self._pool.close(timeout=1.0)
            except Exception:
                logger.debug("closing the store pool failed", exc_info=True)

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

    def pending(self) -> int:
        """Records not yet written nor spooled (queued or being written)."""
        return self._queue.unfinished_tasks

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record submitted so far is written or spooled; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    # -- the caller's side: snapshot and enqueue, never block

    def _submit(self, to_record: Any, item: Any) -> None:
        try:
            self._enqueue(to_record(item))
        except Exception:
            logger.exception("could not record %s", type(item).__name__)

    def _enqueue(self, record: Record) -> None:
        if self._closed or self._thread is None:
            self._spool([record])
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            logger.warning("store queue full; spooling a %s directly", record["kind"])
            self._spool([record])

    def _drain_queue(self, limit: int | None = None) -> list[Record]:
        items: list[Record] = []
        while limit is None or len(items) < limit:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _spool(self, records: Sequence[Record]) -> None:
        if not records:
            return
        try:
            self.spool.append(records)
            self._count("spooled", len(records))
        except Exception:
            logger.exception(
                "cannot write the spool %s: %d records are lost", self.spool.path, len(records)
            )

    def _count(self, name: str, n: int) -> None:
        with self._stats_lock:
            self.stats[name] += n

    # -- the writer thread

    def _run(self) -> None:
        retry_at = 0.0  # monotonic time before which the database is not tried again
        backoff = self._retry_min_s
        spool_dirty = self.spool.pending()
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
                if db_ok and spool_dirty:
                    db_ok = self._replay()
                    spool_dirty = self.spool.pending()
                if batch and db_ok:
                    db_ok = self._write(batch)
                    if not db_ok:
                        self._spool(batch)
                        spool_dirty = True
                elif batch:
                    self._spool(batch)
                    spool_dirty = True
                if db_ok:
                    backoff = self._retry_min_s
                elif time.monotonic() >= retry_at:
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, self._retry_max_s)
            except Exception:
                logger.exception("store writer failed; spooling %d records", len(batch))
                self._spool(batch)
                spool_dirty = True
            finally:
                with self._inflight_lock:
                    self._inflight = []
                for _ in taken:
                    self._queue.task_done()
            if closing and not batch and self._queue.empty():
                return

    def _write(self, records: Sequence[Record]) -> bool:
        """Write records in one transaction; False when the database is unreachable.

        A record the database refuses (bad data) is retried alone, then set aside in the
        ``.rejected`` file next to the spool so that it neither blocks the rest nor vanishes.
        """
        valid: list[Record] = []
        for record in records:
            try:
                _sql_params(record)
                valid.append(record)
            except (ValueError, KeyError, TypeError) as e:
                self._reject(record, e)
        records = valid
        try:
            with self._pool.connection(timeout=self._timeout_s) as conn:
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        for record in records:
                            _apply(cur, record)
                except (psycopg.OperationalError, psycopg.InterfaceError):
                    raise
                except psycopg.Error:
                    for record in records:
                        try:
                            with conn.transaction(), conn.cursor() as cur:
                                _apply(cur, record)
                        except (psycopg.OperationalError, psycopg.InterfaceError):
                            raise
                        except psycopg.Error as e:
                            self._reject(record, e)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            logger.warning("database unreachable (%s); spooling to %s", e, self.spool.path)
            return False
        self._count("written", len(records))
        return True

    def _replay(self) -> bool:
        """Replay every spool file into the database; False when it became unreachable."""
        for path in self.spool.take():
            records = Spool.read(path)
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


# --- queries for the CLI and the API -----------------------------------------------------------

_TURN_COLUMNS = sql.SQL(
    """
    id, conversation_id, seq, user_text, assistant_text, interrupted, error,
    endpoint_ms, stt_ms, llm_ttft_ms, llm_first_chunk_ms, tts_first_ms, v2v_ms,
    bargein_stop_ms, stt_model, llm_model, tts_model, started_at, ended_at, created_at,
    tool_calls
    """
)


def _latest_turns_query(conversation_id: UUID | None) -> sql.Composed:
    """The last %(limit)s turns, oldest first: by sequence within one conversation, by the time
    they happened across all (spool replays make insertion order unreliable)."""
    if conversation_id is None:
        where, newest_first, oldest_first = (
            sql.SQL(""),
            sql.SQL("started_at DESC, seq DESC"),
            sql.SQL("started_at, seq"),
        )
    else:
        where, newest_first, oldest_first = (
            sql.SQL("WHERE conversation_id = %(cid)s"),
            sql.SQL("seq DESC, started_at DESC"),
            sql.SQL("seq, started_at"),
        )
    return sql.SQL(
        "SELECT * FROM (SELECT {columns} FROM turns {where} ORDER BY {newest_first}"
        " LIMIT %(limit)s) latest ORDER BY {oldest_first}"
    ).format(
        columns=_TURN_COLUMNS, where=where, newest_first=newest_first, oldest_first=oldest_first
    )


_TURNS_BY_ID = sql.SQL(
    "SELECT {columns} FROM turns WHERE id = ANY(%(ids)s) ORDER BY started_at, seq"
).format(columns=_TURN_COLUMNS)

_TURNS_SINCE = sql.SQL(
    "SELECT {columns} FROM turns WHERE created_at >= %(since)s"
    " AND (%(cid)s::uuid IS NULL OR conversation_id = %(cid)s)"
    " ORDER BY created_at, seq LIMIT 10000"
).format(columns=_TURN_COLUMNS)


def _stored_turn(row: dict[str, Any]) -> StoredTurn:
    turn = Turn(
        conversation_id=row["conversation_id"],
        sequence=row["seq"],
        user_text=row["user_text"],
        assistant_text=row["assistant_text"],
        interrupted=row["interrupted"],
        error=row["error"],
        timings=Timings(**{name: row[name] for name in _TIMING_FIELDS}),
        stt_model=row["stt_model"],
        llm_model=row["llm_model"],
        tts_model=row["tts_model"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        turn_id=row["id"],
        tool_calls=_tool_calls(row.get("tool_calls")),
    )
    return StoredTurn(turn, row["created_at"])


def get_stored_turns(
    conn: psycopg.Connection[Any], conversation_id: UUID | None = None, limit: int = 50
) -> list[StoredTurn]:
    """The last ``limit`` turns (of one conversation, or of all), oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _latest_turns_query(conversation_id), {"cid": conversation_id, "limit": max(0, limit)}
        )
        return [_stored_turn(row) for row in cur.fetchall()]


def get_turns(
    conn: psycopg.Connection[Any], conversation_id: UUID | None = None, limit: int = 50
) -> list[Turn]:
    """The last ``limit`` turns (of one conversation, or of all), oldest first."""
    return [s.turn for s in get_stored_turns(conn, conversation_id, limit)]


def list_conversations(conn: psycopg.Connection[Any], limit: int = 20) -> list[ConversationSummary]:
    """The latest ``limit`` conversations, newest first, with their turn counts."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """
            SELECT c.id, c.persona, c.channel, c.started_at, c.ended_at, c.caller_ref,
                   (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) AS turns
            FROM conversations c ORDER BY c.started_at DESC LIMIT %s
            """,
            (max(0, limit),),
        )
        return [
            ConversationSummary(
                conversation_id=row["id"],
                persona=row["persona"],
                channel=row["channel"],
                started_at=row["started_at"],
                ended_at=row["ended_at"],
                caller_ref=row["caller_ref"],
                turns=row["turns"],
            )
            for row in cur.fetchall()
        ]


def prune(conn: psycopg.Connection[Any], older_than: timedelta) -> int:
    """Delete conversations (and their turns) whose last activity is older than ``older_than``.

    Returns the number of conversations deleted.
    """
    cutoff = utc_now() - older_than
    with conn.transaction():
        cur = conn.execute(
            """
            DELETE FROM conversations c
            WHERE coalesce(c.ended_at, c.started_at) < %(cutoff)s
              AND NOT EXISTS (
                  SELECT 1 FROM turns t
                  WHERE t.conversation_id = c.id AND t.created_at >= %(cutoff)s
              )
            """,
            {"cutoff": cutoff},
        )
        return cur.rowcount


# --- live transcripts --------------------------------------------------------------------------


async def follow_turns(
    dsn: str, conversation_id: UUID | None = None, *, backlog: int = 0
) -> AsyncIterator[Turn]:
    """Yield turns as they are recorded, by any process, optionally of one conversation.

    ``backlog``: first yield up to that many already-stored turns. Reconnects (catching up on
    what it missed) when the connection drops; the first connection's failure propagates.
    """
    async for stored in follow_stored_turns(dsn, conversation_id, backlog=backlog):
        yield stored.turn


async def follow_stored_turns(
    dsn: str,
    conversation_id: UUID | None = None,
    *,
    backlog: int = 0,
    retry_s: float = 1.0,
) -> AsyncIterator[StoredTurn]:
    """Like ``follow_turns``, with each row's ``created_at``."""
    seen: set[UUID] = set()
    seen_order: deque[UUID] = deque()
    last_created: datetime | None = None
    connected_once = False

    def fresh(stored: StoredTurn) -> bool:
        nonlocal last_created
        turn_id = stored.turn.turn_id
        if turn_id in seen:
            return False
        seen.add(turn_id)
        seen_order.append(turn_id)
        if len(seen_order) > 10_000:
            seen.discard(seen_order.popleft())
        if last_created is None or stored.created_at > last_created:
            last_created = stored.created_at
        return True

    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=5
            ) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                if not connected_once:
                    catch_up = (
                        await _fetch_latest(conn, conversation_id, backlog) if backlog else []
                    )
                elif last_created is not None:
                    catch_up = await _fetch_since(conn, conversation_id, last_created)
                connected_once = True
                for stored in catch_up:
                    if fresh(stored):
                        yield stored
                while True:
                    wanted: list[UUID] = []
                    async for notify in conn.notifies(stop_after=1):
                        turn_id = _wanted_turn(notify.payload, conversation_id)
                        if turn_id is not None:
                            wanted.append(turn_id)
                    for stored in await _fetch_ids(conn, wanted):
                        if fresh(stored):
                            yield stored
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            if not connected_once:
                raise
            logger.warning("lost the live-transcript connection (%s); reconnecting", e)
            await asyncio.sleep(retry_s)


def _wanted_turn(payload: str, conversation_id: UUID | None) -> UUID | None:
    try:
        data = json.loads(payload)
        if conversation_id is not None and UUID(data["conversation_id"]) != conversation_id:
            return None
        return UUID(data["turn_id"])
    except (ValueError, KeyError, TypeError):
        logger.warning("ignoring malformed notification %r", payload[:200])
        return None


async def _fetch_rows(
    conn: psycopg.AsyncConnection[Any], query: sql.Composed, params: dict[str, Any]
) -> list[StoredTurn]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return [_stored_turn(row) for row in await cur.fetchall()]


async def _fetch_ids(conn: psycopg.AsyncConnection[Any], ids: list[UUID]) -> list[StoredTurn]:
    return await _fetch_rows(conn, _TURNS_BY_ID, {"ids": ids}) if ids else []


async def _fetch_latest(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID | None, limit: int
) -> list[StoredTurn]:
    query = _latest_turns_query(conversation_id)
    return await _fetch_rows(conn, query, {"cid": conversation_id, "limit": max(0, limit)})


async def _fetch_since(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID | None, since: datetime
) -> list[StoredTurn]:
    return await _fetch_rows(conn, _TURNS_SINCE, {"cid": conversation_id, "since": since})
