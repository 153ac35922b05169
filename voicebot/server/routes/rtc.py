"""FastRTC's WebRTC and websocket transports: ``POST /webrtc/offer``, ``WS /websocket/offer``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel

if TYPE_CHECKING:
    from voicebot.server.service import VoiceService


class Offer(BaseModel):
    """FastRTC's offer body: an SDP offer, or an ICE candidate for a connection."""

    sdp: str | None = None
    candidate: dict[str, Any] | None = None
    type: str
    webrtc_id: str


def build_router(service: VoiceService) -> APIRouter:
    router = APIRouter(prefix=service.path)
    stream = service.stream

    @router.post("/webrtc/offer", tags=["voicebot"])
    async def offer(body: Offer) -> Any:
        if body.type == "offer" and not service.try_acquire("api"):
            service.metrics.call_rejected("api", "busy")
            return JSONResponse(service.busy_body(), status_code=503)
        outputs = stream.set_additional_outputs(body.webrtc_id)
        return await stream.handle_offer(  # type: ignore[no-untyped-call]
            body.model_dump(), set_outputs=outputs
        )

    @router.websocket("/websocket/offer")
    async def websocket_offer(websocket: WebSocket) -> None:
        if not service.try_acquire("api"):
            service.metrics.call_rejected("api", "busy")
            await websocket.accept()
            await websocket.send_json(service.busy_body())
            await websocket.close(code=1013)
            return
        await stream.websocket_offer(websocket)

    return router
