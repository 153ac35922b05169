"""The turn log and live calls over HTTP: ``GET /api/personas``, ``/api/conversations``,
``/api/conversations/{id}``, ``/api/conversations/{id}/events`` (SSE from the process's one
turn feed: every turn recorded by any process; an ended conversation sends its turns, then
``end``; 503 when the database does not answer or too many clients watch),
``/api/calls/{call_id}/events`` (SSE of one live connection by its FastRTC id / streamSid)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse

from voicebot.conversation import turn_dict
from voicebot.errors import StageError

if TYPE_CHECKING:
    from voicebot.server.service import VoiceService


SSE_KEEPALIVE_S = 15.0

# Query values out of range are the client's mistake: FastAPI answers 422 saying which.
ConversationsLimit = Annotated[int, Query(ge=1, le=500, description="conversations, newest first")]
TurnsLimit = Annotated[int, Query(ge=1, le=10000, description="turns, oldest first")]
Backlog = Annotated[int, Query(ge=0, le=1000, description="stored turns sent first")]


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _sse_stream(
    source: AsyncIterator[tuple[str, Any]], on_close: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """Events from ``source`` with a comment line now and then, so proxies keep it open;
    ``on_close`` runs however the stream ends (the client leaving included)."""
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
        if on_close is not None:
            on_close()


def _sse_response(
    source: AsyncIterator[tuple[str, Any]], on_close: Callable[[], None] | None = None
) -> StreamingResponse:
    return StreamingResponse(
        _sse_stream(source, on_close),
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
    async def conversations(limit: ConversationsLimit = 20) -> Any:
        turn_log = service.turn_log
        if turn_log is None:
            return _no_turn_log()
        try:
            return [c.as_dict() for c in await turn_log.conversations(limit)]
        except StageError as e:
            return _unavailable(e)

    @router.get("/api/conversations/{conversation_id}", tags=["voicebot"])
    async def conversation(conversation_id: uuid.UUID, limit: TurnsLimit = 1000) -> Any:
        turn_log = service.turn_log
        if turn_log is None:
            return _no_turn_log()
        try:
            found = await turn_log.conversation(conversation_id, limit)
        except StageError as e:
            return _unavailable(e)
        if found is None:
            return JSONResponse({"detail": "no such conversation"}, status_code=404)
        return found.as_dict()

    @router.get("/api/conversations/{conversation_id}/events", tags=["voicebot"])
    async def conversation_events(conversation_id: uuid.UUID, backlog: Backlog = 0) -> Response:
        turn_log = service.turn_log
        if turn_log is None:
            return _no_turn_log()
        try:
            subscription = await turn_log.subscribe(conversation_id, backlog)
        except StageError as e:  # FeedFull included: this process watches enough already
            return _unavailable(e)

        async def turns() -> AsyncIterator[tuple[str, Any]]:
            async for turn in subscription:
                yield "turn", turn_dict(turn)

        return _sse_response(turns(), on_close=subscription.close)

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
                        yield "turn", {"final": item.final, "turn": turn_dict(item.turn)}

        return _sse_response(updates())

    return router


def _no_turn_log() -> JSONResponse:
    return JSONResponse({"detail": "no turn log configured"}, status_code=503)


def _unavailable(error: StageError) -> JSONResponse:
    """503 with what went wrong: the database does not answer, or too many live subscribers."""
    return JSONResponse({"detail": error.message}, status_code=503, headers={"Retry-After": "5"})
