"""Reading the turn log: every SELECT and DELETE voicebot runs (the CLI, the API, the feed).

Column lists come from ``records.TURN_COLUMNS``; every value is a bound parameter. Sync functions
take a psycopg ``Connection``, the ``*_async`` ones an ``AsyncConnection``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from voicebot.conversation import TIMING_FIELDS, Channel, Timings, Turn, turn_dict, utc_now
from voicebot.store.records import TURN_COLUMNS, tool_calls_of

MAX_TURNS = 10_000
"""The most turns one read returns (a conversation's detail, a catch-up after a reconnect)."""


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

    def as_dict(self) -> dict[str, Any]:
        """The API's JSON form."""
        return {
            "id": str(self.conversation_id),
            "persona": self.persona,
            "channel": self.channel,
            "caller_ref": self.caller_ref,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "turns": self.turns,
        }


@dataclass(frozen=True)
class ConversationDetail:
    """A conversation and its turns (the conversation's own fields are None when only its
    turns have arrived so far)."""

    conversation_id: UUID
    persona: str | None
    channel: Channel | None
    caller_ref: str | None
    started_at: datetime | None
    ended_at: datetime | None
    turns: list[Turn] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The API's JSON form: the conversation's fields, and its turns as ``turn_dict``."""
        return {
            "id": str(self.conversation_id),
            "persona": self.persona,
            "channel": self.channel,
            "caller_ref": self.caller_ref,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "turns": [turn_dict(t) for t in self.turns],
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


_SELECT_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, (*TURN_COLUMNS, "created_at")))


def stored_turn(row: dict[str, Any]) -> StoredTurn:
    turn = Turn(
        conversation_id=row["conversation_id"],
        sequence=row["seq"],
        user_text=row["user_text"],
        assistant_text=row["assistant_text"],
        interrupted=row["interrupted"],
        error=row["error"],
        timings=Timings(**{name: row[name] for name in TIMING_FIELDS}),
        stt_model=row["stt_model"],
        llm_model=row["llm_model"],
        tts_model=row["tts_model"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        turn_id=row["id"],
        tool_calls=tool_calls_of(row.get("tool_calls")),
        acknowledgement=row.get("acknowledgement") or "",
    )
    return StoredTurn(turn, row["created_at"])


def latest_turns_query(conversation_id: UUID | None) -> sql.Composed:
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
        columns=_SELECT_COLUMNS, where=where, newest_first=newest_first, oldest_first=oldest_first
    )


TURNS_BY_ID = sql.SQL(
    "SELECT {columns} FROM turns WHERE id = ANY(%(ids)s) ORDER BY started_at, seq"
).format(columns=_SELECT_COLUMNS)

TURNS_SINCE = sql.SQL(
    "SELECT {columns} FROM turns WHERE created_at >= %(since)s"
    " AND (%(cid)s::uuid IS NULL OR conversation_id = %(cid)s)"
    " ORDER BY created_at, seq LIMIT {limit}"
).format(columns=_SELECT_COLUMNS, limit=sql.Literal(MAX_TURNS))

TURNS_OF_CONVERSATION = sql.SQL(
    "SELECT {columns} FROM turns WHERE conversation_id = %(cid)s ORDER BY seq LIMIT %(limit)s"
).format(columns=_SELECT_COLUMNS)

_LIST_CONVERSATIONS = """
SELECT c.id, c.persona, c.channel, c.started_at, c.ended_at, c.caller_ref,
       (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) AS turns
FROM conversations c ORDER BY c.started_at DESC LIMIT %(limit)s
"""

CONVERSATION = (
    "SELECT id, persona, channel, caller_ref, started_at, ended_at "
    "FROM conversations WHERE id = %(cid)s"
)

_PRUNE = """
DELETE FROM conversations c
WHERE coalesce(c.ended_at, c.started_at) < %(cutoff)s
  AND NOT EXISTS (
      SELECT 1 FROM turns t
      WHERE t.conversation_id = c.id AND t.created_at >= %(cutoff)s
  )
"""


def _summary(row: dict[str, Any]) -> ConversationSummary:
    return ConversationSummary(
        conversation_id=row["id"],
        persona=row["persona"],
        channel=row["channel"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        caller_ref=row["caller_ref"],
        turns=row["turns"],
    )


def _detail(
    conversation_id: UUID, row: dict[str, Any] | None, turns: list[Turn]
) -> ConversationDetail | None:
    if row is None and not turns:
        return None
    return ConversationDetail(
        conversation_id=conversation_id,
        persona=row["persona"] if row else None,
        channel=row["channel"] if row else None,
        caller_ref=row["caller_ref"] if row else None,
        started_at=row["started_at"] if row else None,
        ended_at=row["ended_at"] if row else None,
        turns=turns,
    )


def _bounded(limit: int) -> int:
    return max(0, min(limit, MAX_TURNS))


# --- sync (CLI, the store's own reads) ---------------------------------------------------------


def get_stored_turns(
    conn: psycopg.Connection[Any], conversation_id: UUID | None = None, limit: int = 50
) -> list[StoredTurn]:
    """The last ``limit`` turns (of one conversation, or of all), oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            latest_turns_query(conversation_id), {"cid": conversation_id, "limit": max(0, limit)}
        )
        return [stored_turn(row) for row in cur.fetchall()]


def get_turns(
    conn: psycopg.Connection[Any], conversation_id: UUID | None = None, limit: int = 50
) -> list[Turn]:
    """The last ``limit`` turns (of one conversation, or of all), oldest first."""
    return [s.turn for s in get_stored_turns(conn, conversation_id, limit)]


def list_conversations(conn: psycopg.Connection[Any], limit: int = 20) -> list[ConversationSummary]:
    """The latest ``limit`` conversations, newest first, with their turn counts."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_LIST_CONVERSATIONS, {"limit": max(0, limit)})
        return [_summary(row) for row in cur.fetchall()]


def prune(conn: psycopg.Connection[Any], older_than: timedelta) -> int:
    """Delete conversations (and their turns) whose last activity is older than ``older_than``.

    Returns the number of conversations deleted.
    """
    cutoff = utc_now() - older_than
    with conn.transaction():
        cur = conn.execute(_PRUNE, {"cutoff": cutoff})
        return cur.rowcount


# --- async (the API and the live feed) ---------------------------------------------------------


async def _fetch(
    conn: psycopg.AsyncConnection[Any], query: sql.Composed | str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def list_conversations_async(
    conn: psycopg.AsyncConnection[Any], limit: int = 20
) -> list[ConversationSummary]:
    """Like ``list_conversations``."""
    return [_summary(r) for r in await _fetch(conn, _LIST_CONVERSATIONS, {"limit": max(0, limit)})]


async def read_conversation_async(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID, limit: int = 1000
) -> ConversationDetail | None:
    """The conversation and its first ``limit`` turns by sequence; None when nothing is known."""
    rows = await _fetch(conn, CONVERSATION, {"cid": conversation_id})
    turns = await fetch_conversation_turns(conn, conversation_id, limit)
    return _detail(conversation_id, rows[0] if rows else None, [s.turn for s in turns])


async def conversation_ended_async(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID
) -> bool:
    """Whether the conversation has ended (False when it is unknown)."""
    rows = await _fetch(conn, CONVERSATION, {"cid": conversation_id})
    return bool(rows) and rows[0]["ended_at"] is not None


async def fetch_conversation_turns(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID, limit: int = MAX_TURNS
) -> list[StoredTurn]:
    rows = await _fetch(
        conn, TURNS_OF_CONVERSATION, {"cid": conversation_id, "limit": _bounded(limit)}
    )
    return [stored_turn(r) for r in rows]


async def fetch_ids(conn: psycopg.AsyncConnection[Any], ids: list[UUID]) -> list[StoredTurn]:
    if not ids:
        return []
    return [stored_turn(r) for r in await _fetch(conn, TURNS_BY_ID, {"ids": ids})]


async def fetch_latest(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID | None, limit: int
) -> list[StoredTurn]:
    query = latest_turns_query(conversation_id)
    rows = await _fetch(conn, query, {"cid": conversation_id, "limit": _bounded(limit)})
    return [stored_turn(r) for r in rows]


async def fetch_since(
    conn: psycopg.AsyncConnection[Any], conversation_id: UUID | None, since: datetime
) -> list[StoredTurn]:
    rows = await _fetch(conn, TURNS_SINCE, {"cid": conversation_id, "since": since})
    return [stored_turn(r) for r in rows]


async def ping_async(conn: psycopg.AsyncConnection[Any]) -> None:
    """A round trip; raises psycopg.Error when the database does not answer."""
    await conn.execute("SELECT 1")


_CREATE_SECRET = (
    "INSERT INTO shared_secrets (name, value) VALUES (%(name)s, %(value)s)"
    " ON CONFLICT (name) DO NOTHING"
)
_READ_SECRET = "SELECT value FROM shared_secrets WHERE name = %(name)s"


async def shared_secret_async(conn: psycopg.AsyncConnection[Any], name: str, candidate: str) -> str:
    """The value every replica shares under ``name``: ``candidate`` if this call created it,
    else the one stored first."""
    await conn.execute(_CREATE_SECRET, {"name": name, "value": candidate})
    rows = await _fetch(conn, _READ_SECRET, {"name": name})
    return str(rows[0]["value"])
