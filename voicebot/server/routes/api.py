"""The turn log and live calls over HTTP: ``GET /api/personas``, ``/api/conversations``,
``/api/conversations/{id}``, ``/api/conversations/{id}/events`` (SSE from the turn log's
LISTEN/NOTIFY feed, any process), ``/api/calls/{call_id}/events`` (SSE of one live connection
by its FastRTC id / streamSid)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from voicebot.conversation import Turn

if TYPE_CHECKING:
    from voicebot.server.service import VoiceService


SSE_KEEPALIVE_S = 15.0


def _turn_json(turn: Turn) -> dict[str, Any]:
    data = dataclasses.asdict(turn)
    out: dict[str, Any] = json.loads(json.dumps(data, default=str))  # UUIDs, datetimes → str
    return out


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _sse_stream(source: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[bytes]:
    """Events from ``source`` with a comment line now and then, so proxies keep it open."""
    yield b": connected\n\n"
    iterator = source.__aiter__()
    next_item: asyncio.Task[tuple[str, Any]] | None = None
    try:
        while True:
            if next_item is None:
                next_item = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({next_item}, timeout=SSE_KEEPALIVE_S)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                event, data = next_item.result()
            except StopAsyncIteration:
                yield _sse("end", {})
                return
            next_item = None
            yield _sse(event, data)
    finally:
        if next_item is not None:
            next_item.cancel()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _sse_response(source: AsyncIterator[tuple[str, Any]]) -> StreamingResponse:
    return StreamingResponse(
        _sse_stream(source),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def build_router(service: VoiceService) -> APIRouter:
    router = APIRouter(prefix=service.path)
    stream = service.stream

    @router.get("/api/personas", tags=["voicebot"])
    async def personas() -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "display_name": stack.persona.display_name,
                "language": stack.persona.language,
                "default": name == service.runtime.default_persona,
            }
            for name, stack in service.runtime.stacks.items()
        ]

    @router.get("/api/conversations", tags=["voicebot"])
    async def conversations(limit: int = 20) -> Any:
        pool = _pool_or_503(service)
        if isinstance(pool, Response):
            return pool
        async with pool.connection() as conn:
            return await _list_conversations(conn, max(0, min(limit, 500)))

    @router.get("/api/conversations/{conversation_id}", tags=["voicebot"])
    async def conversation(conversation_id: uuid.UUID, limit: int = 1000) -> Any:
        pool = _pool_or_503(service)
        if isinstance(pool, Response):
            return pool
        async with pool.connection() as conn:
            found = await _read_conversation(conn, conversation_id, min(limit, 10000))
        if found is None:
            return JSONResponse({"detail": "no such conversation"}, status_code=404)
        return found

    @router.get("/api/conversations/{conversation_id}/events", tags=["voicebot"])
    async def conversation_events(conversation_id: uuid.UUID, backlog: int = 0) -> Response:
        from voicebot.store import follow_turns

        if service.backend is None or service.backend.dsn is None:
            return JSONResponse({"detail": "no turn log configured"}, status_code=503)
        dsn = service.backend.dsn

        async def turns() -> AsyncIterator[tuple[str, Any]]:
            async for turn in follow_turns(dsn, conversation_id, backlog=max(0, backlog)):
                yield "turn", _turn_json(turn)

        return _sse_response(turns())

    @router.get("/api/calls/{call_id}/events", tags=["voicebot"])
    async def call_events(call_id: str) -> Response:
        known = (
            call_id in stream.pcs
            or call_id in stream.connections
            or service.has_phone_call(call_id)
            or call_id in stream.additional_outputs
        )
        if not known:
            return JSONResponse({"detail": "no such call"}, status_code=404)

        async def updates() -> AsyncIterator[tuple[str, Any]]:
            from voicebot.handler import TurnUpdate

            async for output in stream.output_stream(call_id):
                for item in output.args:
                    if isinstance(item, TurnUpdate):
                        yield "turn", {"final": item.final, "turn": _turn_json(item.turn)}

        return _sse_response(updates())

    return router


async def _list_conversations(conn: Any, limit: int) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT c.id, c.persona, c.channel, c.caller_ref, c.started_at, c.ended_at, "
            "(SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) AS turns "
            "FROM conversations c ORDER BY c.started_at DESC LIMIT %s",
            (limit,),
        )
        rows = await cur.fetchall()
    return [
        {
            "id": str(r["id"]),
            "persona": r["persona"],
            "channel": r["channel"],
            "caller_ref": r["caller_ref"],
            "started_at": _iso(r["started_at"]),
            "ended_at": _iso(r["ended_at"]),
            "turns": r["turns"],
        }
        for r in rows
    ]


def _pool_or_503(service: VoiceService) -> Any:
    if service.pool is None:
        return JSONResponse({"detail": "no turn log configured"}, status_code=503)
    return service.pool


async def _read_conversation(
    conn: Any, conversation_id: uuid.UUID, limit: int
) -> dict[str, Any] | None:
    from psycopg.rows import dict_row

    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, persona, channel, caller_ref, started_at, ended_at "
            "FROM conversations WHERE id = %s",
            (conversation_id,),
        )
        row = await cur.fetchone()
        await cur.execute(
            "SELECT id, seq, user_text, assistant_text, interrupted, error, endpoint_ms, stt_ms, "
            "llm_ttft_ms, tts_first_ms, v2v_ms, bargein_stop_ms, stt_model, llm_model, "
            "tts_model, started_at, ended_at FROM turns WHERE conversation_id = %s "
            "ORDER BY seq LIMIT %s",
            (conversation_id, limit),
        )
        turns = await cur.fetchall()
    if row is None and not turns:
        return None
    timing_keys = ("endpoint_ms", "stt_ms", "llm_ttft_ms", "tts_first_ms", "v2v_ms")
    out_turns = [
        {
            "id": str(t["id"]),
            "sequence": t["seq"],
            "user_text": t["user_text"],
            "assistant_text": t["assistant_text"],
            "interrupted": t["interrupted"],
            "error": t["error"],
            "timings": {k: t[k] for k in (*timing_keys, "bargein_stop_ms")},
            "models": {"stt": t["stt_model"], "llm": t["llm_model"], "tts": t["tts_model"]},
            "started_at": _iso(t["started_at"]),
            "ended_at": _iso(t["ended_at"]),
        }
        for t in turns
    ]
    return {
        "id": str(conversation_id),
        "persona": row["persona"] if row else None,
        "channel": row["channel"] if row else None,
        "caller_ref": row["caller_ref"] if row else None,
        "started_at": _iso(row["started_at"]) if row else None,
        "ended_at": _iso(row["ended_at"]) if row else None,
        "turns": out_turns,
    }


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
