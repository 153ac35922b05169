"""Probes and counters: ``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from voicebot.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from voicebot.server.service import VoiceService


def build_router(service: VoiceService) -> APIRouter:
    router = APIRouter(prefix=service.path)

    @router.get("/healthz", tags=["voicebot"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", tags=["voicebot"])
    async def readyz() -> Response:
        checks = await _readiness(service)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @router.get("/metrics", tags=["voicebot"])
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return router

    return router


async def _readiness(service: VoiceService) -> dict[str, dict[str, Any]]:
    import httpx

    checks: dict[str, dict[str, Any]] = {}
    backend = service.backend
    checks["models"] = {
        "ok": backend is not None,
        "detail": ", ".join(backend.runtime.stacks) if backend is not None else "not loaded",
    }
    host = service.settings.ollama_host.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            reply = await client.get(f"{host}/api/version")
        checks["ollama"] = {
            "ok": reply.status_code == 200,
            "detail": f"{host}: {reply.status_code}",
        }
    except httpx.HTTPError as e:
        checks["ollama"] = {"ok": False, "detail": f"{host}: {type(e).__name__}"}
    turn_log = service.turn_log
    if turn_log is None:
        checks["database"] = {"ok": backend is not None, "detail": "no turn log configured"}
    else:
        reachable = await turn_log.ping()
        checks["database"] = {
            "ok": reachable,
            "detail": "reachable" if reachable else "unreachable",
        }
    return checks
