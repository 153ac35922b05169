"""Who may use a mount: bearer token, body size limit, log redaction, refusal to serve exposed.

With ``VOICEBOT_API_TOKEN`` set, every route but ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <token>`` (or ``?token=`` for websockets and the page, which then sets
a cookie); Twilio's routes need a valid ``X-Twilio-Signature`` instead when
``TWILIO_AUTH_TOKEN`` is set. Without a token, a mount answers only requests that arrive on
loopback, from loopback, not through a proxy (judged per request: the host app's real bind
address decides, not ``settings.host``); ``voicebot serve`` and ``ui`` refuse to start beyond
loopback without one. The guard matches the path the router matches (root path removed).

Who may continue which conversation (``resume_refusal``) and the log redaction that keeps
tokens out of every log record (``install_log_redaction``) live here too.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import re
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voicebot.conversation import Channel
from voicebot.errors import ConfigError
from voicebot.settings import Settings

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


# A query value named like a token (token=, access_token=, voicebot_token=...) and a bearer
# credential, wherever they appear in a log line.
_TOKEN_IN_TEXT = re.compile(r"(?i)(token=|bearer\s+)[^&\s\"']+")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with token query values, bearer credentials and each of ``secrets`` masked."""
    text = _TOKEN_IN_TEXT.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class RedactTokenFilter(logging.Filter):
    """Masks tokens in a record's message and arguments (for a handler or logger of your own;
    ``install_log_redaction`` covers every logger of the process)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record, self.secrets)
        return True


def _redact_record(record: logging.LogRecord, secrets: tuple[str, ...]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format: the handler reports it, with the arguments it has
        return
    clean = redact(message, secrets)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = redact(text, secrets)
        if clean != text:
            record.exc_text = clean  # what Formatter.format would have cached, masked


def log_secrets(settings: Settings) -> list[str]:
    """The configured secrets a log must never show."""
    return [
        secret.get_secret_value()
        for secret in (settings.api_token, settings.twilio_auth_token)
        if secret is not None and secret.get_secret_value()
    ]


_redaction_lock = threading.Lock()
_redaction_secrets: set[str] = set()


def install_log_redaction(secrets: Iterable[str] = ()) -> None:
    """Mask tokens in every log record this process creates, whatever logger or handler it
    goes through (uvicorn's ``"WebSocket /…?token=…" [accepted]`` included): the record
    factory redacts the message before any handler sees it. Idempotent; ``secrets`` (e.g.
    the API token) are masked wherever they appear."""
    with _redaction_lock:
        _redaction_secrets.update(s for s in secrets if s)
        current = logging.getLogRecordFactory()
        if getattr(current, "voicebot_redacts", False):
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = current(*args, **kwargs)
            _redact_record(record, tuple(_redaction_secrets))
            return record

        factory.voicebot_redacts = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def route_path(scope: Scope) -> str:
    """The path the app's router matches: ``scope["path"]`` less the root path, as Starlette
    does (a server's ``--root-path``, ``FastAPI(root_path=...)`` or a parent ``Mount``)."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _relative(path: str, prefix: str) -> str | None:
    if not prefix:
        return path
    if path == prefix or path.startswith(prefix + "/"):
        return path[len(prefix) :] or "/"
    return None


def _ip_not_loopback(address: Any) -> str | None:
    """The host of an ASGI ``server``/``client`` pair when it is an IP off loopback."""
    if not isinstance(address, list | tuple) or not address or not isinstance(address[0], str):
        return None  # a unix socket, or a test transport with no address
    try:
        ip = ipaddress.ip_address(address[0].strip("[]"))
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return None if ip.is_loopback or (mapped is not None and mapped.is_loopback) else address[0]


_PROXY_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def exposure_of(scope: Scope) -> str | None:
    """Why a request did not come from this machine directly (None when it did): it arrived
    on an address off loopback, from a client off loopback, or through a proxy."""
    local = _ip_not_loopback(scope.get("server"))
    if local is not None:
        return f"it arrived on {local}"
    client = _ip_not_loopback(scope.get("client"))
    if client is not None:
        return f"it came from {client}"
    headers = dict(scope.get("headers") or [])
    if any(h in headers for h in _PROXY_HEADERS):
        return "it came through a proxy"
    return None


@dataclass(frozen=True)
class GuardPolicy:
    """What one mount's guard enforces."""

    prefix: str
    """The mount path inside the app ("" = every path)."""
    api_token: str | None
    max_body_bytes: int
    twilio_signed: bool = False
    """Twilio's routes are checked by their signature instead of the bearer token."""
    open_paths: frozenset[str] = frozenset({"/healthz", "/readyz"})
    cookie_paths: tuple[str, ...] = ("/ui",)
    """Where a ``?token=`` visit gets the token as a cookie (the page's own requests)."""
    on_reject: Callable[[Channel, str], None] | None = None


class Guard:
    """ASGI middleware for one mount: bearer token, loopback-only serving without a token, body
    size limit. Paths outside the mount, and the open paths (health probes), pass untouched;
    Twilio routes are left to the signature check."""

    def __init__(self, app: ASGIApp, *, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = self.policy
        rel = _relative(route_path(scope), policy.prefix)
        if rel is None or rel in policy.open_paths or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if rel.startswith("/telephone/") and policy.twilio_signed:
            await self._limited(scope, receive, send)
            return
        token = policy.api_token
        if token is None:
            exposed = exposure_of(scope)
            if exposed is not None:
                self._reject(rel, "exposed")
                if not self._warned:
                    self._warned = True
                    logger.error(
                        "refused a request: %s, and no VOICEBOT_API_TOKEN is set (without one "
                        "voicebot answers only on loopback)",
                        exposed,
                    )
                await _deny(
                    scope,
                    receive,
                    send,
                    403,
                    "this server has no VOICEBOT_API_TOKEN: it answers only on loopback",
                )
                return
            await self._limited(scope, receive, send)
            return
        given, from_query = _token_of(scope)
        if not _same(given, token):
            self._reject(rel, "unauthorized")
            await _deny(scope, receive, send, 401, "missing or wrong bearer token")
            return
        if (
            from_query
            and scope["type"] == "http"
            and any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in policy.cookie_paths)
        ):
            public_prefix = (scope.get("root_path", "") or "") + policy.prefix
            send = _with_cookie(send, token, public_prefix or "/")
        await self._limited(scope, receive, send)

    def _reject(self, rel: str, reason: str) -> None:
        if self.policy.on_reject is not None:
            self.policy.on_reject(_channel_of(rel), reason)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.policy.max_body_bytes
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


@dataclass(frozen=True)
class StoredConversation:
    """What the turn log says a conversation was started with."""

    persona: str | None
    channel: str | None


def resume_refusal(
    stored: StoredConversation | None, *, persona: str, channel: Channel
) -> str | None:
    """Why a call may not continue a stored conversation; None when it may.

    Only the page continues conversations, and only its own: one started on the page, with
    the persona this call uses. A phone (or API, or simulated) conversation is never loaded
    into a page call's context, and continuing never changes what a conversation was started
    with (the turn log keeps a conversation's first record)."""
    if channel != "web":
        return f"a {channel} call does not continue conversations"
    if stored is None:
        return "the turn log has no such conversation"
    if stored.channel != channel:
        return f"it is a {stored.channel or 'not yet recorded'} conversation, not a page one"
    if stored.persona != persona:
        return f"it was started with another persona ({stored.persona})"
    return None
