"""Who may use a mount: bearer token, body size limit, log redaction, refusal to serve exposed.

With ``VOICEBOT_API_TOKEN`` set, every route but ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <token>`` (or ``?token=`` for websockets and the page, which then sets
a cookie); Twilio's routes need a valid ``X-Twilio-Signature`` instead when
``TWILIO_AUTH_TOKEN`` is set. Without a token the server only runs bound to loopback.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import re
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voicebot.conversation import Channel
from voicebot.errors import ConfigError
from voicebot.settings import Settings

if TYPE_CHECKING:
    from voicebot.server.service import VoiceService

logger = logging.getLogger(__name__)

TOKEN_COOKIE = "voicebot_token"


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


class Guard:
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
