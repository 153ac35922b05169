"""Probes and counters: ``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus text).

``/healthz`` says the process answers. ``/readyz`` is for a load balancer: 200 when this
replica can take a call, 503 when it is full, draining, starting, or has lost a dependency it
cannot work without. It reads cached state (the service refreshes its checks in the background),
so probing it often costs nothing. Without the token it answers only its status; with it (or
when no token is configured, loopback only) it also names each check, the personas and the
LLM's URL.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from voicebot.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from voicebot.server.service import Readiness, VoiceService


def build_router(service: VoiceService) -> APIRouter:
    router = APIRouter(prefix=service.path)

    @router.get("/healthz", tags=["voicebot"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", tags=["voicebot"])
    async def readyz(request: Request) -> Response:
        readiness = service.readiness()
        body: dict[str, Any] = {"ready": readiness.ready, "status": readiness.status}
        if _authorized(service, request):
            body.update(_details(readiness))
        return JSONResponse(
            body,
            status_code=200 if readiness.ready else 503,
            headers={"Cache-Control": "no-store"},
        )

    @router.get("/metrics", tags=["voicebot"])
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router


def _authorized(service: VoiceService, request: Request) -> bool:
    """Whether the probe may see details: the bearer token, or no token configured."""
    token = service.api_token
    if token is None:
        return True
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _details(readiness: Readiness) -> dict[str, Any]:
    return {
        "free_lines": readiness.free_lines,
        "limit": readiness.limit,
        "checks": {
            name: {"ok": c.ok, "required": c.required, "detail": c.detail}
            for name, c in readiness.checks.items()
        },
    }
