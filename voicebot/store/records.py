"""The one serialized form of what the store writes (queue, spool and SQL parameters), and the
SQL that writes it.

The turn columns are built from ``TURN_COLUMNS``, which follows ``TIMING_FIELDS``: a timing added
to ``Timings`` needs a migration adding its column, and nothing else here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from voicebot.conversation import TIMING_FIELDS, Conversation, ToolCallRecord, Turn

NOTIFY_CHANNEL = "voicebot_turns"
"""The LISTEN/NOTIFY channel every inserted turn (and every conversation end) is announced on:
``{"conversation_id", "turn_id", "sequence"}`` for a turn, ``{"conversation_id", "ended": true}``
for the end of a conversation."""

Record = dict[str, Any]
"""A JSON-ready record: ``{"kind": "conversation" | "conversation_end" | "turn", ...}``."""

CHANNELS = ("web", "phone", "api", "simulate")

TURN_COLUMNS: tuple[str, ...] = (
    "id",
    "conversation_id",
    "seq",
    "user_text",
    "assistant_text",
    "interrupted",
    "error",
    *TIMING_FIELDS,
    "stt_model",
    "llm_model",
    "tts_model",
    "started_at",
    "ended_at",
    "tool_calls",
    "acknowledgement",
)
"""The columns of ``turns`` a turn is written to and read from (``created_at`` is the server's)."""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dt(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _ms(value: float | None) -> float | None:
    return None if value is None else float(value)  # numpy scalars are not JSON


def _opt_str(value: str | None) -> str | None:
    return None if value is None else str(value)


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


def turn_record(turn: Turn) -> Record:
    """A snapshot of the turn (later changes to the object do not affect what is stored),
    keyed by ``TURN_COLUMNS``."""
    t = turn.timings
    record: Record = {
        "kind": "turn",
        "id": str(turn.turn_id),
        "conversation_id": str(turn.conversation_id),
        "seq": int(turn.sequence),
        "user_text": str(turn.user_text),
        "assistant_text": str(turn.assistant_text),
        "interrupted": bool(turn.interrupted),
        "error": _opt_str(turn.error),
    }
    record |= {name: _ms(getattr(t, name)) for name in TIMING_FIELDS}
    record |= {
        "stt_model": _opt_str(turn.stt_model),
        "llm_model": _opt_str(turn.llm_model),
        "tts_model": _opt_str(turn.tts_model),
        "started_at": _iso(turn.started_at),
        "ended_at": _iso(turn.ended_at),
        "tool_calls": [tool_call_json(c) for c in turn.tool_calls],
        "acknowledgement": str(turn.acknowledgement),
    }
    return record


def tool_call_json(call: ToolCallRecord) -> dict[str, Any]:
    """One tool call as stored in ``turns.tool_calls`` (jsonb) and spooled."""
    return {
        "name": call.name,
        "arguments": call.arguments,
        "result": call.result,
        "tool_ms": _ms(call.tool_ms),
        "error": call.error,
    }


def tool_calls_of(value: Any) -> list[ToolCallRecord]:
    """The tool calls of a stored or spooled turn (``tool_call_json`` items)."""
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


def sql_params(record: Record) -> Record:
    """Validate a (possibly spooled) record and convert it to typed SQL parameters.

    Raises KeyError/ValueError/TypeError for a record that is not one of ours.
    """
    kind = record["kind"]
    params: Record = {"id": UUID(str(record["id"]))}
    if kind == "conversation":
        channel = record["channel"]
        if channel not in CHANNELS:
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
            "tool_calls": Jsonb(
                [tool_call_json(c) for c in tool_calls_of(record.get("tool_calls"))]
            ),
            "acknowledgement": str(record.get("acknowledgement") or ""),
        }
        for name in TIMING_FIELDS:
            value = record.get(name)
            params[name] = None if value is None else float(value)
    else:
        raise ValueError(f"unknown record kind {kind!r}")
    return params


_UPSERT_CONVERSATION = sql.SQL(
    """
INSERT INTO conversations (id, persona, channel, caller_ref, started_at)
VALUES (%(id)s, %(persona)s, %(channel)s, %(caller_ref)s, %(started_at)s)
ON CONFLICT (id) DO UPDATE SET
    persona = EXCLUDED.persona,
    channel = EXCLUDED.channel,
    caller_ref = EXCLUDED.caller_ref,
    started_at = EXCLUDED.started_at
WHERE conversations.persona IS NULL  -- only a stub (turns first): a conversation keeps its start
"""
)

_END_CONVERSATION = sql.SQL(
    """
WITH ended AS (
    INSERT INTO conversations (id, started_at, ended_at)
    VALUES (%(id)s, %(ended_at)s, %(ended_at)s)
    ON CONFLICT (id) DO UPDATE SET ended_at = EXCLUDED.ended_at
    RETURNING id
)
SELECT pg_notify(%(channel)s, json_build_object('conversation_id', id, 'ended', true)::text)
FROM ended
"""
)

# A turn may reach the database before its conversation record (spool replays are not ordered
# with the queue): insert a stub the conversation record later completes.
_STUB_CONVERSATION = sql.SQL(
    """
INSERT INTO conversations (id, started_at) VALUES (%(conversation_id)s, %(started_at)s)
ON CONFLICT (id) DO NOTHING
"""
)

_INSERT_TURN = sql.SQL(
    """
WITH inserted AS (
    INSERT INTO turns ({columns}) VALUES ({values})
    ON CONFLICT (id) DO NOTHING
    RETURNING id, conversation_id, seq
)
SELECT pg_notify(
    %(channel)s,
    json_build_object('conversation_id', conversation_id, 'turn_id', id, 'sequence', seq)::text
) FROM inserted
"""
).format(
    columns=sql.SQL(", ").join(map(sql.Identifier, TURN_COLUMNS)),
    values=sql.SQL(", ").join(map(sql.Placeholder, TURN_COLUMNS)),
)


def apply(cur: psycopg.Cursor[Any], record: Record) -> None:
    """Write one record (idempotent: a record applied twice is stored once)."""
    params = sql_params(record)
    kind = record["kind"]
    if kind == "conversation":
        cur.execute(_UPSERT_CONVERSATION, params)
    elif kind == "conversation_end":
        cur.execute(_END_CONVERSATION, params | {"channel": NOTIFY_CHANNEL})
    else:
        cur.execute(_STUB_CONVERSATION, params)
        cur.execute(_INSERT_TURN, params | {"channel": NOTIFY_CHANNEL})
