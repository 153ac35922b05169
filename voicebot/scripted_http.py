"""What the scripted LLM servers share: the listener, its faults, and streaming to a client
that may leave.

:mod:`voicebot.ollama_server` and :mod:`voicebot.openai_server` speak different protocols
over the same machinery, built on ``http.server.ThreadingHTTPServer`` so that it needs no
dependency and each stream can watch its own socket: the listener can be taken ``down``
and brought back at runtime, open connections are dropped with it, requests are recorded
(the last ``max_recorded``), and a client that closes its connection is noticed before the
next chunk.
"""

from __future__ import annotations

import http.server
import json
import logging
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar, get_args

logger = logging.getLogger(__name__)

Fault = Literal["ok", "down", "http_500", "slow", "error_midstream", "hang", "disconnect_midstream"]
FAULTS: tuple[str, ...] = get_args(Fault)


@dataclass(frozen=True)
class LlmProfile:
    """How fast the simulated model answers.

    name: profile name, as given on the command line.
    ttft_s: seconds from request to the first token.
    tokens_per_s: generation speed after the first token; 0 means no delay at all.
    """

    name: str
    ttft_s: float
    tokens_per_s: float


PROFILES: dict[str, LlmProfile] = {
    "gpu-8b": LlmProfile("gpu-8b", 0.150, 60.0),
    "cpu-3b": LlmProfile("cpu-3b", 0.600, 12.0),
    "instant": LlmProfile("instant", 0.0, 0.0),
}


class Disconnected(Exception):
    """The client went away (or the server is stopping) while we were streaming."""


class _Finishes(Protocol):
    finished: threading.Event


RecordT = TypeVar("RecordT", bound=_Finishes)


class ScriptedServer(Generic[RecordT]):
    """A loopback HTTP server paced by a profile, whose listener can fail on demand;
    subclasses add the routes.

    ``requests`` lists the requests received, in arrival order (the last ``max_recorded``).
    A ``slow`` fault delays the first token to ``ttft * slow_factor``, at least ``slow_min_s``.
    """

    kind: ClassVar[str]
    """What the log calls it, e.g. "Ollama-protocol server"; also names its thread."""

    def __init__(
        self,
        profile: LlmProfile | str,
        *,
        handler: type[ScriptedHandler],
        host: str,
        port: int,
        fault: Fault,
        slow_factor: float,
        slow_min_s: float,
        max_recorded: int,
    ) -> None:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
            profile = PROFILES[profile]
        self.profile = profile
        self._handler = handler
        self.slow_factor = slow_factor
        self.slow_min_s = slow_min_s
        self.host = host
        self.port = port
        self.max_recorded = max_recorded
        self.requests: list[RecordT] = []
        self._lock = threading.RLock()
        self._fault: Fault = "ok"
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._running = False
        self._stopping = threading.Event()
        self.fault = fault

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        return f"http://{self.host}:{self.port}"

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called: streams in progress end."""
        return self._stopping.is_set()

    def start(self) -> str:
        """Bind and serve in a background thread; returns ``base_url``."""
        with self._lock:
            if self._running:
                return self.base_url
            self._running = True
            self._stopping.clear()
            if self._fault != "down":
                self._listen()
        logger.info("%s on %s (profile %s)", self.kind, self.base_url, self.profile.name)
        return self.base_url

    def stop(self) -> None:
        """Stop listening, drop open connections and end running streams."""
        with self._lock:
            self._running = False
            self._stopping.set()
            self._unlisten()

    def serve_until_interrupted(self) -> None:
        """Run in the foreground until Ctrl-C (the ``python -m`` entry points)."""
        self.start()
        logger.info("serving at %s; Ctrl-C stops", self.base_url)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def fault(self) -> Fault:
        """The current fault mode; settable at any time from any thread."""
        with self._lock:
            return self._fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        if value not in FAULTS:
            raise ValueError(f"unknown fault {value!r}; expected one of {', '.join(FAULTS)}")
        with self._lock:
            previous, self._fault = self._fault, value
            if not self._running or previous == value:
                return
            if value == "down":
                self._unlisten()
            elif previous == "down":
                self._listen()

    def first_token_delay(self, fault: Fault) -> float:
        """Seconds from a chat request to its first token under ``fault``."""
        ttft = self.profile.ttft_s
        return max(ttft * self.slow_factor, self.slow_min_s) if fault == "slow" else ttft

    def token_interval(self) -> float:
        rate = self.profile.tokens_per_s
        return 1.0 / rate if rate > 0 else 0.0

    def record(self, request: RecordT) -> None:
        """Keep ``request`` in ``requests``; a long-running server must not grow without bound."""
        with self._lock:
            self.requests.append(request)
            if len(self.requests) > self.max_recorded:
                del self.requests[: len(self.requests) - self.max_recorded]

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _listen(self) -> None:
        httpd = _HTTPServer((self.host, self.port), self._handler, self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.kind.split()[0].lower()}-server-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _unlisten(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=2)
        # Idle keep-alive connections would otherwise still be served: a downed server
        # drops them too.
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._connections.clear()


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Many concurrent bench sessions connect at once.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        owner: ScriptedServer[Any],
    ) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients resetting idle keep-alive connections are routine; socketserver would
        # print a traceback to stderr for each.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("connection from %s ended: %s", client_address, exc)
        else:
            logger.exception("error while serving %s", client_address)


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """One connection: JSON in, JSON or a chunked stream out, ``Disconnected`` if the
    client leaves. Subclasses route in ``dispatch``."""

    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as httpx expects
    disable_nagle_algorithm = True  # tokens are tiny writes; don't let Nagle batch them
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.owner.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.owner.track(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def dispatch(self, method: str) -> None:
        raise NotImplementedError

    def read_json(self) -> dict[str, Any]:
        """The request's JSON object body (``{}`` when empty); ``ValueError`` otherwise."""
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def client_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; True if the client closed its side (or the server stops)."""
        if self.server.owner.stopping:
            return True
        # poll, not select: select fails on descriptors above 1024 (many bench sessions).
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | select.POLLHUP | select.POLLERR)
        if not poller.poll(max(timeout, 0.0) * 1000):
            return False
        try:
            data = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        if data:
            # A pipelined request, not a close: just wait out the time.
            time.sleep(max(timeout, 0.0))
            return False
        return True

    def wait(self, seconds: float) -> None:
        """Sleep, but raise ``Disconnected`` as soon as the client leaves or the server stops."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self.client_gone(min(max(left, 0.0), 0.05)):
                raise Disconnected
            if left <= 0:
                return

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError as e:
            raise Disconnected from e

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_bytes(status, data, "application/json; charset=utf-8")

    def start_stream(self, content_type: str) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        except OSError as e:
            raise Disconnected from e

    def send_chunk(self, data: bytes) -> None:
        """One chunk of the stream, unless the client has left."""
        if self.client_gone(0):
            raise Disconnected
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        except OSError as e:
            raise Disconnected from e

    def end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError as e:
            raise Disconnected from e

    def drop_connection(self) -> None:
        """Close the connection without finishing the response, as a crashed server does."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError as e:
            raise Disconnected from e
