"""Twilio: ``POST /telephone/incoming`` (TwiML) and ``WS /telephone/handler`` (media).

With ``TWILIO_AUTH_TOKEN`` set, both check ``X-Twilio-Signature`` against the URL Twilio used:
``VOICEBOT_PUBLIC_URL`` when set, else the request's scheme (a proxy's ``X-Forwarded-Proto``,
applied by the server) and ``Host``, plus the root path and the path. The webhook answers a
CallSid once and hands out a one-time ticket (``voicebot.telephony.StreamTickets``) in the
TwiML; the media stream must bring it back in its ``start`` message, and takes its persona and
caller from the ticket, never from its own (unsigned) parameters.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response

from voicebot.server.access import route_path
from voicebot.server.service import GOODBYE_GRACE_S

if TYPE_CHECKING:
    from voicebot.handler import TurnUpdate
    from voicebot.server.service import VoiceService
    from voicebot.telephony import StreamStart


logger = logging.getLogger(__name__)


async def caller_salt(service: VoiceService) -> bytes | None:
    """The caller-hash salt: the ``caller_hash_salt`` setting, else the one shared by every
    replica through the turn log, else (no turn log) a file in the data dir. None (the caller
    then goes unhashed, logged) while the turn log cannot be read."""
    from voicebot.errors import StageError
    from voicebot.telephony import load_salt

    settings = service.settings
    configured = settings.caller_hash_salt.get_secret_value() if settings.caller_hash_salt else ""
    if configured:
        return configured.encode()
    turn_log = service.turn_log
    if turn_log is None:
        return await asyncio.to_thread(load_salt, None, settings.data_dir / "caller-salt")
    try:
        return await turn_log.caller_salt()
    except StageError as e:
        logger.warning("caller not hashed: %s", e)
        return None


def build_router(service: VoiceService) -> APIRouter:
    settings = service.settings
    router = APIRouter(prefix=service.path)
    stream = service.stream
    from voicebot.telephony import StreamTickets  # numpy: not at import

    tickets = StreamTickets()
    signed = service.signature_checker is not None

    @router.post("/telephone/incoming", tags=["voicebot"])
    async def incoming(request: Request) -> Response:
        from voicebot.telephony import caller_hash, twiml_busy, twiml_connect

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
        call_sid = form.get("CallSid") or None
        if signed and call_sid is None:
            service.metrics.call_rejected("phone", "bad_request")
            return PlainTextResponse("no CallSid in the webhook", status_code=400)
        caller = None
        if form.get("From"):
            salt = await caller_salt(service)
            if salt is not None:
                caller = caller_hash(form["From"], salt)
        ticket = tickets.issue(call_sid, persona.name, caller)
        if ticket is None:
            service.metrics.call_rejected("phone", "replayed")
            logger.warning("call %s was answered already: no second media stream", call_sid)
            return PlainTextResponse("this call was answered already", status_code=409)
        url = _stream_url(service, request)
        return Response(twiml_connect(url, {"ticket": ticket}), media_type="application/xml")

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
            admit=admit,
        )
        await call.run()

    def admit(start: StreamStart) -> dict[str, str] | None:
        """The parameters a stream may use: its ticket's, or (bearer-token or loopback serving,
        no Twilio signatures) its own when it brings no ticket."""
        ticket = start.parameters.get("ticket")
        if ticket is None and not signed:
            return dict(start.parameters)
        record = tickets.redeem(ticket, start.call_sid)
        if record is None:
            logger.warning(
                "media stream %s refused: %s ticket",
                start.stream_sid,
                "no" if ticket is None else "an unknown, expired or used",
            )
            return None
        trusted = {"persona": record.persona}
        if record.caller is not None:
            trusted["caller"] = record.caller
        return trusted

    return router


def public_url(service: VoiceService, conn: Request | WebSocket) -> str:
    """The URL a client outside used for this request (what Twilio signs): the configured
    public URL or the request's scheme and Host, then the root path, the path and the query."""
    scope = conn.scope
    path = (scope.get("root_path") or "") + route_path(scope)
    query = scope.get("query_string", b"").decode("latin-1")
    return _public_base(service, conn) + path + (f"?{query}" if query else "")


def _public_base(service: VoiceService, conn: Request | WebSocket) -> str:
    websocket = conn.url.scheme in ("ws", "wss")
    if service.settings.public_url:
        base = service.settings.public_url.rstrip("/")
        return re.sub(r"^http", "ws", base) if websocket else base
    return f"{conn.url.scheme}://{conn.url.netloc}"


def _stream_url(service: VoiceService, request: Request) -> str:
    """Where Twilio opens the Media Stream: this mount's handler route, always over wss."""
    if service.settings.public_url:
        base = service.settings.public_url.rstrip("/")
    else:
        base = f"https://{request.url.netloc}"
    base = re.sub(r"^http", "ws", base)  # https → wss (Twilio only connects to wss)
    root = request.scope.get("root_path") or ""
    return f"{base}{root}{service.path}/telephone/handler"


def _twilio_ok(
    service: VoiceService, signature: str | None, conn: Request | WebSocket, params: dict[str, str]
) -> bool:
    """Twilio's signature over the URL it used (and the form fields, for POSTs)."""
    checker = service.signature_checker
    if checker is None:
        return True  # the bearer-token guard (or loopback-only serving) protects the route
    full = public_url(service, conn)
    ok: bool = checker.valid(full, params, signature)
    if not ok:
        logger.warning(
            "rejected a request to %s with a missing or forged Twilio signature", conn.url.path
        )
    return ok
