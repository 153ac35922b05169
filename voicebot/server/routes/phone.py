"""Twilio: ``POST /telephone/incoming`` (TwiML) and ``WS /telephone/handler`` (media)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response

from voicebot.server.service import GOODBYE_GRACE_S

if TYPE_CHECKING:
    from voicebot.handler import TurnUpdate
    from voicebot.server.service import VoiceService


logger = logging.getLogger(__name__)


def build_router(service: VoiceService) -> APIRouter:
    settings = service.settings
    router = APIRouter(prefix=service.path)
    stream = service.stream

    @router.post("/telephone/incoming", tags=["voicebot"])
    async def incoming(request: Request) -> Response:
        from voicebot.telephony import caller_hash, load_salt, twiml_busy, twiml_connect

        form = {k: str(v) for k, v in (await request.form()).items()}
        if not _twilio_ok(service, request.headers.get("x-twilio-signature"), request, form):
            service.metrics.call_rejected("phone", "bad_signature")
            return PlainTextResponse("invalid Twilio signature", status_code=403)
        persona_name = settings.phone_personas.get(form.get("To", ""), None)
        persona = service.runtime.stack(persona_name).persona
        if service.free_lines() == 0:  # full, or draining
            service.metrics.call_rejected("phone", "busy")
            return Response(
                twiml_busy(persona.busy_message, persona.language), media_type="application/xml"
            )
        parameters = {"persona": persona.name}
        if form.get("From"):
            salt = await asyncio.to_thread(
                load_salt,
                settings.caller_hash_salt.get_secret_value() if settings.caller_hash_salt else None,
                settings.data_dir / "caller-salt",
            )
            parameters["caller"] = caller_hash(form["From"], salt)
        url = _stream_url(service, request)
        return Response(twiml_connect(url, parameters), media_type="application/xml")

    @router.websocket("/telephone/handler")
    async def telephone(websocket: WebSocket) -> None:
        from voicebot.telephony import PhoneCall

        signature = websocket.headers.get("x-twilio-signature")
        if not _twilio_ok(service, signature, websocket, {}):
            service.metrics.call_rejected("phone", "bad_signature")
            await websocket.close(code=1008)
            return

        def on_update(sid: str, update: TurnUpdate) -> None:
            from fastrtc import AdditionalOutputs

            stream.set_additional_outputs(sid)(AdditionalOutputs(update))

        def on_end(sid: str) -> None:
            service.phone_call_ended(sid)
            outputs = stream.additional_outputs.pop(sid, None)
            if outputs is not None:
                outputs.quit.set()

        call = PhoneCall(
            websocket,
            new_handler=lambda persona, caller: service.new_handler(
                "phone", persona=persona, caller_ref=caller
            ),
            busy_line=service.busy_line,
            slots=service,
            time_limit_s=settings.time_limit_s,
            grace_s=GOODBYE_GRACE_S,
            on_start=service.phone_call_started,
            on_update=on_update,
            on_end=on_end,
            on_reject=lambda reason: service.metrics.call_rejected("phone", reason),
        )
        await call.run()

    return router


def _public_base(service: VoiceService, scheme: str, netloc: str) -> str:
    if service.settings.public_url:
        return service.settings.public_url.rstrip("/")
    return f"{scheme}://{netloc}"


def _stream_url(service: VoiceService, request: Request) -> str:
    base = _public_base(service, "https", request.url.netloc)
    base = re.sub(r"^http", "ws", base)  # https → wss (Twilio only connects to wss)
    return f"{base}{service.path}/telephone/handler"


def _twilio_ok(
    service: VoiceService, signature: str | None, conn: Request | WebSocket, params: dict[str, str]
) -> bool:
    """Twilio's signature over the URL it used (and the form fields, for POSTs)."""
    checker = service.signature_checker
    if checker is None:
        return True  # the bearer-token guard (or loopback-only serving) protects the route
    url = conn.url
    scheme = url.scheme
    if service.settings.public_url:
        base = service.settings.public_url.rstrip("/")
        if scheme in ("ws", "wss"):
            base = re.sub(r"^http", "ws", base)
    else:
        base = f"{scheme}://{url.netloc}"
    full = base + url.path + (f"?{url.query}" if url.query else "")
    ok: bool = checker.valid(full, params, signature)
    if not ok:
        logger.warning(
            "rejected a request to %s with a missing or forged Twilio signature", url.path
        )
    return ok
