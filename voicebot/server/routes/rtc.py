"""FastRTC's WebRTC and websocket transports: ``POST /webrtc/offer``, ``WS /websocket/offer``.

Both take their line from the service before FastRTC does any work; bad offers get a 400 that
says what is wrong, a duplicate connection id a 409, a full or draining server a 503.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse, Response
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
        data = body.model_dump(exclude_none=True)
        outputs = stream.set_additional_outputs(body.webrtc_id)
        reply = await service.answer_offer(stream, "api", data, outputs)
        if isinstance(reply.body, Response) or reply.status_code == 200:
            return reply.body
        return JSONResponse(reply.body, status_code=reply.status_code)

    @router.websocket("/websocket/offer")
    async def websocket_offer(websocket: WebSocket) -> None:
        await service.serve_websocket(websocket)

    return router
