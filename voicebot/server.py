"""Serving the agent: ``create_app()`` and ``mount(app)`` for FastAPI, with what FastRTC lacks.

Routes under the mount path (``""`` for ``create_app``):

- ``POST /webrtc/offer``, ``WS /websocket/offer``: FastRTC's WebRTC and websocket transports.
- ``POST /telephone/incoming``, ``WS /telephone/handler``: Twilio (``voicebot.telephony``).
- ``GET /api/personas``, ``/api/conversations``, ``/api/conversations/{id}``,
  ``/api/conversations/{id}/events`` (SSE from the turn log's LISTEN/NOTIFY feed, any process),
  ``/api/calls/{call_id}/events`` (SSE of one live connection by its FastRTC id / streamSid).
- ``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus text).
- ``/ui``: the Gradio page, when asked for.

Access: with ``VOICEBOT_API_TOKEN`` set, every route but ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <token>`` (or ``?token=`` for websockets and the page, which then sets
a cookie); Twilio's routes need a valid ``X-Twilio-Signature`` instead when
``TWILIO_AUTH_TOKEN`` is set. Without a token the server only runs bound to loopback.

Models load in the app's lifespan, once per app even when mounted twice with equal settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voicebot.conversation import Channel, Turn
from voicebot.errors import ConfigError
from voicebot.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voicebot.metrics import Metrics
from voicebot.settings import Settings

if TYPE_CHECKING:
    from voicebot.handler import TurnUpdate, VoiceHandler
    from voicebot.runtime import Runtime

logger = logging.getLogger(__name__)

GOODBYE_GRACE_S = 20.0
"""After the time limit, how long the goodbye may take before the call is cut."""
TOKEN_COOKIE = "voicebot_token"
SSE_KEEPALIVE_S = 15.0


# --- what the lifespan loads -------------------------------------------------------------------


@dataclass
class Backend:
    """What one process loads once: the models (runtime) and the turn log's DSN."""

    runtime: Runtime
    dsn: str | None = None


BackendFactory = Callable[[Settings], AbstractContextManager[Backend]]


@contextlib.contextmanager
def default_backend(settings: Settings, personas: Iterable[str] | None = None) -> Iterator[Backend]:
    """PostgreSQL (embedded unless VOICEBOT_DATABASE_URL), the turn store and the models of
    ``personas`` (default: every persona file)."""
    from voicebot.app import build_runtime
    from voicebot.database import open_database
    from voicebot.reservations.book import ReservationBook
    from voicebot.store import PostgresTurnStore

    with open_database(settings) as database:
        logger.info("turn log in %s", database.display_dsn)
        store = PostgresTurnStore(
            database.dsn, settings.spool_path, settings.store_queue_size
        ).start()
        try:
            with ReservationBook.connect(database.dsn) as book:
                runtime = build_runtime(settings, personas=personas, store=store, reservations=book)
                yield Backend(runtime, database.dsn)
        finally:
            store.close()


@dataclass
class _Shared:
    """A backend shared by the mounts of one app with equal settings."""

    settings: Settings
    factory: BackendFactory
    users: int = 0
    backend: Backend | None = None
    context: AbstractContextManager[Backend] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def acquire(self) -> Backend:
        async with self.lock:
            if self.backend is None:
                context = self.factory(self.settings)
                self.backend = await asyncio.to_thread(context.__enter__)
                self.context = context
            self.users += 1
            return self.backend

    async def release(self) -> None:
        async with self.lock:
            self.users -= 1
            if self.users == 0 and self.context is not None:
                context, self.context, self.backend = self.context, None, None
                await asyncio.to_thread(context.__exit__, None, None, None)


def _shared_backend(app: FastAPI, settings: Settings, factory: BackendFactory) -> _Shared:
    registry: list[_Shared] = app.state.__dict__.setdefault("_voicebot_backends", [])
    for shared in registry:
        if shared.factory is factory and shared.settings == settings:
            return shared
    shared = _Shared(settings, factory)
    registry.append(shared)
    return shared


# --- access control ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond loopback without an API token (ConfigError says how to set one)."""
    if settings.api_token is not None and settings.api_token.get_secret_value():
        return
    if is_loopback(settings.host):
        logger.warning(
            "no VOICEBOT_API_TOKEN set: the API is open to anyone on this machine (%s)",
            settings.host,
        )
        return
    raise ConfigError(
        f"refusing to listen on {settings.host} without an API token: set VOICEBOT_API_TOKEN "
        "(e.g. `export VOICEBOT_API_TOKEN=$(python -c 'import secrets; "
        "print(secrets.token_urlsafe(32))')`) or bind to 127.0.0.1."
    )


_TOKEN_IN_QUERY = re.compile(r"(?i)(token=)[^&\s]*")


class RedactTokenFilter(logging.Filter):
    """Masks ``token=`` query values in uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class _Guard:
    """ASGI middleware for one mount: bearer token, body size limit. Paths outside the mount,
    and the health probes, pass untouched; Twilio routes are left to the signature check."""

    def __init__(self, app: ASGIApp, *, service: VoiceService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rel = self.service.relative_path(scope.get("path", ""))
        if rel is None or rel in ("/healthz", "/readyz") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if rel.startswith("/telephone/") and self.service.signature_checker is not None:
            await self._limited(scope, receive, send)
            return
        token = self.service.api_token
        if token is None:
            await self._limited(scope, receive, send)
            return
        given, from_query = _token_of(scope)
        if not _same(given, token):
            self.service.metrics.call_rejected(_channel_of(rel), "unauthorized")
            await _deny(scope, receive, send, 401, "missing or wrong bearer token")
            return
        if from_query and rel.startswith("/ui") and scope["type"] == "http":
            send = _with_cookie(send, token, self.service.path or "/")
        await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.service.settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _deny(scope, receive, send, 413, f"request body over {limit} bytes")
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            # Chunked bodies have no length: count as they arrive and answer 413 ourselves.
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    await _deny(scope, receive, send, 413, f"request body over {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not refused:
                raise
            logger.debug("request cut at the body limit", exc_info=True)


def _token_of(scope: Scope) -> tuple[str | None, bool]:
    """The token a request carries: Authorization header, cookie, or ``?token=``."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    cookie = headers.get(b"cookie")
    if cookie:
        jar: SimpleCookie = SimpleCookie()
        with contextlib.suppress(Exception):
            jar.load(cookie.decode("latin-1"))
        if TOKEN_COOKIE in jar:
            return jar[TOKEN_COOKIE].value, False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if "token" in query:
        return query["token"][0], True
    return None, False


def _with_cookie(send: Send, token: str, path: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            value = f"{TOKEN_COOKIE}={token}; Path={path}; HttpOnly; SameSite=Strict"
            message["headers"] = [*message.get("headers", []), (b"set-cookie", value.encode())]
        await send(message)

    return wrapped


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        # Answer the handshake with a real HTTP status when the server can; else close (403).
        if "websocket.http.response" in scope.get("extensions", {}):
            body = json.dumps({"detail": detail}).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await response(scope, receive, send)


def _channel_of(rel: str) -> Channel:
    if rel.startswith("/telephone/"):
        return "phone"
    if rel.startswith("/ui"):
        return "web"
    return "api"


# --- handlers the transports copy --------------------------------------------------------------


def _served_handler_class() -> type[Any]:
    from fastrtc import StreamHandler

    from voicebot.handler import OUTPUT_RATE, VoiceHandler
    from voicebot.vad import VAD_SAMPLE_RATE

    class ServedHandler(VoiceHandler):
        """A call's handler that tells the service when it starts and ends."""

        service: VoiceService

        def start_up(self) -> None:
            self.service.call_started(self)
            super().start_up()

        def shutdown(self) -> None:
            try:
                super().shutdown()
            finally:
                self.service.call_ended(self)

    class Prototype(StreamHandler):
        """What FastRTC holds before the models are loaded: ``copy()`` makes the real handler."""

        def __init__(self, service: VoiceService, channel: Channel, from_ui: bool) -> None:
            super().__init__(
                expected_layout="mono",
                output_sample_rate=OUTPUT_RATE,
                input_sample_rate=VAD_SAMPLE_RATE,
            )
            self.service = service
            self.kind = channel
            self.from_ui = from_ui

        def copy(self) -> VoiceHandler:
            return self.service.new_handler(self.kind, persona_from_ui=self.from_ui)

        def receive(self, frame: Any) -> None:
            raise RuntimeError("the prototype handler does not take calls")

        def emit(self) -> None:
            return None

    ServedHandler.Prototype = Prototype  # type: ignore[attr-defined]
    return ServedHandler


# --- the service -------------------------------------------------------------------------------


class VoiceService:
    """One mount's state: its FastRTC streams, limits, metrics and loaded backend."""

    def __init__(
        self,
        app: FastAPI,
        settings: Settings,
        *,
        path: str = "",
        backend: BackendFactory | None = None,
    ) -> None:
        from fastrtc import Stream

        self.settings = settings
        self.path = path.rstrip("/")
        self.metrics = Metrics()
        self.limit = int(settings.concurrency_limit)
        if self.limit < 1:
            raise ConfigError("VOICEBOT_CONCURRENCY_LIMIT must be at least 1")
        token = settings.api_token.get_secret_value() if settings.api_token else ""
        self.api_token: str | None = token or None
        self.signature_checker: Any = None
        if settings.twilio_auth_token is not None:
            from voicebot.telephony import SignatureChecker

            self.signature_checker = SignatureChecker(settings.twilio_auth_token.get_secret_value())
        self._shared = _shared_backend(app, settings, backend or default_backend)
        self.backend: Backend | None = None
        self._handler_class = _served_handler_class()
        self._calls: dict[int, tuple[VoiceHandler, Channel, float]] = {}
        self._ending: set[int] = set()
        self._phone_active = 0
        self._phone_calls: set[str] = set()
        self._pool: Any = None
        prototype = self._handler_class.Prototype(self, "api", False)
        hard_limit = (
            None if settings.time_limit_s is None else settings.time_limit_s + GOODBYE_GRACE_S
        )
        # concurrency_limit and time_limit are always explicit: FastRTC's default means 1 call.
        self.stream = Stream(
            prototype,
            modality="audio",
            mode="send-receive",
            concurrency_limit=self.limit,
            time_limit=hard_limit,
            verbose=False,
        )
        self.ui_stream: Any = None
        for channel in ("web", "api", "phone"):
            self.metrics.track_active(channel, lambda c=channel: self.active(c))  # type: ignore[misc]

    # -- paths

    def relative_path(self, path: str) -> str | None:
        """``path`` inside this mount, or None when it is not ours."""
        if not self.path:
            return path
        if path == self.path or path.startswith(self.path + "/"):
            return path[len(self.path) :] or "/"
        return None

    # -- lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Load (or share) the backend, run the time-limit watchdog; undo both on exit."""
        self.backend = await self._shared.acquire()
        if self.backend.dsn is not None:
            from psycopg_pool import AsyncConnectionPool

            self._pool = AsyncConnectionPool(
                self.backend.dsn, min_size=0, max_size=4, open=False, timeout=5.0
            )
            await self._pool.open(wait=False)
        watchdog = asyncio.create_task(self._watch_time_limits())
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            self.backend = None
            await self._shared.release()

    def db_pool(self) -> Any:
        """The mount's async psycopg pool for the API routes; None without a database."""
        return self._pool

    @property
    def runtime(self) -> Runtime:
        if self.backend is None:
            raise RuntimeError("voicebot is not started: run the app with its lifespan")
        return self.backend.runtime

    # -- calls and limits

    def new_handler(
        self,
        channel: Channel,
        *,
        persona: str | None = None,
        persona_from_ui: bool = False,
        caller_ref: str | None = None,
    ) -> VoiceHandler:
        handler: VoiceHandler = self._handler_class(
            self.runtime,
            channel=channel,
            persona=persona if persona in self.runtime.stacks else None,
            persona_from_ui=persona_from_ui,
            caller_ref=caller_ref,
            observer=self.metrics,
        )
        handler.service = self  # type: ignore[attr-defined]
        return handler

    def call_started(self, handler: VoiceHandler) -> None:
        self._calls[id(handler)] = (handler, handler.channel_kind, time.monotonic())
        self.metrics.call_started(handler.channel_kind)

    def call_ended(self, handler: VoiceHandler) -> None:
        self._calls.pop(id(handler), None)
        self._ending.discard(id(handler))

    def active(self, channel: Channel | None = None) -> int:
        """Calls in progress (connecting ones included), on one channel or all."""
        counts: dict[str, int] = {
            "api": len(set(self.stream.pcs) | set(self.stream.connections)),
            "phone": self._phone_active,
            "web": 0,
        }
        if self.ui_stream is not None:
            component = getattr(self.ui_stream, "webrtc_component", None)
            counts["web"] = len(getattr(component, "pcs", {}))
        return counts[channel] if channel is not None else sum(counts.values())

    def try_acquire(self, channel: Channel) -> bool:
        if self.active() >= self.limit:
            return False
        if channel == "phone":
            self._phone_active += 1
        return True

    def release(self, channel: Channel) -> None:
        if channel == "phone":
            self._phone_active = max(0, self._phone_active - 1)

    async def _watch_time_limits(self) -> None:
        """Say the persona's goodbye to every call over its time limit."""
        limit = self.settings.time_limit_s
        if limit is None:
            return
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for key, (handler, _, started) in list(self._calls.items()):
                if key in self._ending or now - started < limit:
                    continue
                self._ending.add(key)
                goodbye = handler.runtime.stack(handler.persona_name).persona.goodbye
                logger.info("call %s reached its time limit", handler.conversation_id)
                await asyncio.to_thread(handler.end_call, goodbye or "")

    def busy_line(self, persona: str | None) -> tuple[str, Any]:
        """The busy message of a persona and the voice to say it in."""
        stack = self.runtime.stack(persona)
        return stack.persona.busy_message, stack.synthesizer

    def busy_body(self) -> dict[str, Any]:
        return {
            "status": "failed",
            "meta": {"error": "concurrency_limit_reached", "limit": self.limit},
            "detail": f"all {self.limit} lines are busy; try again in a few minutes",
        }


# --- routes ------------------------------------------------------------------------------------


class Offer(BaseModel):
    """FastRTC's offer body: an SDP offer, or an ICE candidate for a connection."""

    sdp: str | None = None
    candidate: dict[str, Any] | None = None
    type: str
    webrtc_id: str


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


def _build_router(service: VoiceService) -> APIRouter:
    settings = service.settings
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

    @router.post("/telephone/incoming", tags=["voicebot"])
    async def incoming(request: Request) -> Response:
        from voicebot.telephony import caller_hash, load_salt, twiml_busy, twiml_connect

        form = {k: str(v) for k, v in (await request.form()).items()}
        if not _twilio_ok(service, request.headers.get("x-twilio-signature"), request, form):
            service.metrics.call_rejected("phone", "bad_signature")
            return PlainTextResponse("invalid Twilio signature", status_code=403)
        persona_name = settings.phone_personas.get(form.get("To", ""), None)
        persona = service.runtime.stack(persona_name).persona
        if service.active() >= service.limit:
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
            service._phone_calls.discard(sid)
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
            on_start=service._phone_calls.add,
            on_update=on_update,
            on_end=on_end,
            on_reject=lambda reason: service.metrics.call_rejected("phone", reason),
        )
        await call.run()

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
            or call_id in service._phone_calls
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
    if service._pool is None:
        return JSONResponse({"detail": "no turn log configured"}, status_code=503)
    return service._pool


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
    if service._pool is None:
        checks["database"] = {"ok": backend is not None, "detail": "no turn log configured"}
    else:
        try:
            async with service._pool.connection(timeout=2.0) as conn:
                await conn.execute("SELECT 1")
            checks["database"] = {"ok": True, "detail": "reachable"}
        except Exception as e:
            checks["database"] = {"ok": False, "detail": type(e).__name__}
    return checks


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


# --- public API --------------------------------------------------------------------------------


def mount(
    app: FastAPI,
    path: str = "/voice",
    *,
    settings: Settings | None = None,
    ui: bool = False,
    backend: BackendFactory | None = None,
) -> VoiceService:
    """Add the agent's routes under ``path`` to an existing FastAPI app.

    Models load when the app's lifespan starts (once per app for equal settings) and are
    released when it ends. Returns the mount's ``VoiceService``.
    """
    settings = settings or Settings()
    check_exposure(settings)
    path = path.rstrip("/")
    if path and not path.startswith("/"):
        raise ConfigError(f"mount path must start with '/': {path!r}")
    service = VoiceService(app, settings, path=path, backend=backend)
    app.include_router(_build_router(service))
    from voicebot.reservations.api import reservations_router

    app.include_router(reservations_router(service.db_pool, prefix=path))
    app.add_middleware(_Guard, service=service)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with previous(a) as state, service.running():
            yield state

    app.router.lifespan_context = lifespan
    if ui:
        _mount_ui(app, service)
    return service


def _mount_ui(app: FastAPI, service: VoiceService) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from voicebot.app import select_personas
    from voicebot.ui import build_call_stream

    settings = service.settings
    # Persona choices are read from the files: the models are not loaded yet.
    choices = [(p.display_name, name) for name, p in select_personas(settings, None).items()]
    prototype = service._handler_class.Prototype(service, "web", True)
    hard_limit = None if settings.time_limit_s is None else settings.time_limit_s + GOODBYE_GRACE_S
    service.ui_stream = build_call_stream(
        prototype,
        choices,
        settings.persona,
        concurrency_limit=service.limit,
        time_limit=hard_limit,
    )
    gr.mount_gradio_app(app, service.ui_stream.ui, path=f"{service.path}/ui")


def create_app(
    settings: Settings | None = None, *, ui: bool = False, backend: BackendFactory | None = None
) -> FastAPI:
    """A FastAPI app serving the agent at the root; nothing loads until its lifespan starts."""
    app = FastAPI(title="voicebot", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, "", settings=settings, ui=ui, backend=backend)
    return app


__all__ = [
    "Backend",
    "BackendFactory",
    "RedactTokenFilter",
    "VoiceService",
    "check_exposure",
    "create_app",
    "default_backend",
    "is_loopback",
    "mount",
]
