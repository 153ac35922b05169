"""``GET /api/reservations[?date=YYYY-MM-DD&limit=N]``: the live bookings, as JSON.

``reservations_router(pool_of, prefix)`` builds the route; the server includes it under its
mount path, where its bearer-token guard already applies to every ``/api`` route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from voicebot.reservations.book import list_reservations_async
from voicebot.reservations.cli import reservation_json
from voicebot.reservations.rules import parse_day


def reservations_router(pool_of: Callable[[], Any], prefix: str = "") -> APIRouter:
    """The route; ``pool_of()`` returns the server's psycopg ``AsyncConnectionPool`` or None
    while no database is configured (then it answers 503)."""
    router = APIRouter(prefix=prefix)

    @router.get("/api/reservations", tags=["voicebot"])
    async def reservations(date: str | None = None, limit: int = 1000) -> Any:
        try:
            day = parse_day(date) if date is not None else None
        except ValueError as e:
            return JSONResponse({"detail": f"date: {e}"}, status_code=422)
        pool = pool_of()
        if pool is None:
            return JSONResponse({"detail": "no database configured"}, status_code=503)
        async with pool.connection() as conn:
            found = await list_reservations_async(conn, day=day, limit=max(0, min(limit, 10000)))
        return [reservation_json(r) for r in found]

    return router
