"""One mount's state: its FastRTC streams, lines, readiness, drain, metrics and the backend
its lifespan loads.

Lines: every channel (the page's WebRTC, the API's WebRTC offer and websocket, the phone) takes
a line from one ``LineBook`` when a call connects, before any of its work starts (greeting,
conversation row), and gives it back exactly once when the call is over, however it ended.

Readiness is cached: a background task refreshes the dependency checks every few seconds, so a
probe costs nothing. Draining (``begin_drain``, ``drain``) stops admitting at once, lets calls
finish, then ends what is left with the persona's goodbye.

Models load in the app's lifespan, once per app even when mounted twice with equal settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI

from voicebot.conversation import Channel
from voicebot.errors import ConfigError
from voicebot.metrics import Metrics
from voicebot.settings import Settings

if TYPE_CHECKING:
    from voicebot.handler import VoiceHandler
    from voicebot.runtime import Runtime
    from voicebot.store import TurnLog

logger = logging.getLogger(__name__)

GOODBYE_GRACE_S = 20.0
"""After the time limit, how long the goodbye may take before the call is cut."""
RESUME_LOOKUP_S = 5.0
"""Longest wait for the turn log to say whether a call may continue a conversation."""
WEBSOCKET_START_TIMEOUT_S = 10.0
"""How long a ``/websocket/offer`` client may take to send ``start`` (capped by the time limit)."""
READINESS_REFRESH_S = 5.0
"""How often the background check refreshes the dependencies' state for ``/readyz``."""
DEPENDENCY_TIMEOUT_S = 2.0
DRAIN_GOODBYE_S = 15.0
"""While draining, how long the goodbye may take before a call is cut."""
HANG_UP_WAIT_S = 5.0
"""How long cut calls may take to give their lines back before we stop waiting."""


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
    from voicebot.app import build_runtime, open_persistence

    with open_persistence(settings) as persistence:
        runtime = build_runtime(
            settings,
            personas=personas,
            store=persistence.store,
            reservations=persistence.reservations,
        )
        yield Backend(runtime, persistence.store.dsn)


@dataclass
class _Shared:
    """A backend shared by the mounts of one app with equal settings."""

    settings: Settings
    factory: BackendFactory
    users: int = 0
    backend: Backend | None = None
    context: AbstractContextManager[Backend] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    turn_log: TurnLog | None = None
    """Reads and live turns of the turn log: one per process, like the backend."""

    async def acquire(self) -> Backend:
        async with self.lock:
            if self.backend is None:
                context = self.factory(self.settings)
                self.backend = await asyncio.to_thread(context.__enter__)
                self.context = context
                if self.backend.dsn is not None:
                    from voicebot.store import TurnLog

                    self.turn_log = TurnLog(self.backend.dsn)
                    await self.turn_log.start()
            self.users += 1
            return self.backend

    async def release(self) -> None:
        async with self.lock:
            self.users -= 1
            if self.users == 0 and self.context is not None:
                context, self.context, self.backend = self.context, None, None
                turn_log, self.turn_log = self.turn_log, None
                if turn_log is not None:
                    await turn_log.close()
                await asyncio.to_thread(context.__exit__, None, None, None)


def _shared_backend(app: FastAPI, settings: Settings, factory: BackendFactory) -> _Shared:
    registry: list[_Shared] = app.state.__dict__.setdefault("_voicebot_backends", [])
    for shared in registry:
        if shared.factory is factory and shared.settings == settings:
            return shared
    shared = _Shared(settings, factory)
    registry.append(shared)
    return shared


# --- handlers the transports copy --------------------------------------------------------------


def _served_handler_classes() -> tuple[type[Any], type[Any]]:
    """The handler class a served call runs, and the prototype FastRTC copies it from."""
    from fastrtc import StreamHandler

    from voicebot.handler import OUTPUT_RATE, VoiceHandler
    from voicebot.vad import VAD_SAMPLE_RATE

    class ServedHandler(VoiceHandler):
        """A call's handler that tells the service when it starts and ends."""

        def __init__(self, runtime: Runtime, *, service: VoiceService, **kwargs: Any) -> None:
            super().__init__(runtime, **kwargs)
            self.service = service

        def start_up(self) -> None:
            self.service.call_started(self)
            super().start_up()

        def resume(self, conversation_id: str | uuid.UUID) -> None:
            refusal = self.service.resume_refusal(
                conversation_id, self.persona_name, self.channel_kind
            )
            if refusal is not None:
                logger.warning(
                    "call %s: not continuing conversation %.40r (%s); starting a new one",
                    self.conversation_id,
                    str(conversation_id),
                    refusal,
                )
                return
            super().resume(conversation_id)

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

    return ServedHandler, Prototype


# --- lines -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Line:
    """One admitted call's hold on the limit. ``release()`` may be called any number of times;
    only the first gives the line back."""

    channel: Channel
    key: str
    taken_at: float
    book: LineBook = field(repr=False)
    hang_up: Callable[[], Awaitable[None]] | None = None
    """Ends the call from our side (closes its connection); set by the transport."""
    released: bool = False

    def release(self) -> None:
        self.book.release(self)


class LineBook:
    """The call limit every channel shares; thread-safe (calls end on worker threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held: dict[str, Line] = {}

    def take(self, channel: Channel, key: str) -> Line | None:
        """A line for the call ``key``, or None when every line is busy (or ``key`` holds one)."""
        with self._lock:
            if len(self._held) >= self.limit or key in self._held:
                return None
            line = Line(channel, key, time.monotonic(), self)
            self._held[key] = line
            return line

    def release(self, line: Line) -> None:
        with self._lock:
            if line.released:
                return
            line.released = True
            if self._held.get(line.key) is line:
                del self._held[line.key]

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._held

    def held(self) -> list[Line]:
        with self._lock:
            return list(self._held.values())

    def active(self, channel: Channel | None = None) -> int:
        with self._lock:
            return sum(1 for line in self._held.values() if channel in (None, line.channel))

    def free(self) -> int:
        with self._lock:
            return max(0, self.limit - len(self._held))


# --- readiness ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One dependency's state at the last refresh."""

    ok: bool
    detail: str
    required: bool = True
    """Whether the replica is unready without it (the turn log is not: the store spools)."""


ReadyStatus = Literal["ready", "starting", "full", "draining", "unavailable"]


@dataclass(frozen=True)
class Readiness:
    """What ``/readyz`` answers: ``ready`` (200) or why not (503), from cached state."""

    status: ReadyStatus
    free_lines: int
    limit: int
    checks: Mapping[str, Check]
    checked_at: float | None
    """``time.monotonic()`` of the last dependency refresh."""

    @property
    def ready(self) -> bool:
        return self.status == "ready"


# --- the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfferReply:
    """The answer to a WebRTC offer: an HTTP status and FastRTC's (or our) body."""

    status_code: int
    body: Any


class VoiceService:
    """One mount's state: its FastRTC streams, lines, readiness, metrics and loaded backend."""

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
        self._handler_class, self._prototype_class = _served_handler_classes()
        self.lines = LineBook(self.limit)
        self._calls: dict[int, tuple[VoiceHandler, Channel, float]] = {}
        self._calls_lock = threading.Lock()
        self._ending: set[int] = set()
        self._phone_lines: list[Line] = []
        self._phone_numbers = itertools.count()
        self._phone_calls: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn_log: TurnLog | None = None
        self._draining = False
        self._checks: dict[str, Check] = {}
        self._checked_at: float | None = None
        self._http: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        prototype = self.prototype("api", from_ui=False)
        # concurrency_limit and time_limit are always explicit: FastRTC's default means 1 call.
        rtc = settings.rtc_configuration.as_dict() if settings.rtc_configuration else None
        self.stream = Stream(
            prototype,
            modality="audio",
            mode="send-receive",
            concurrency_limit=self.limit,
            time_limit=self.hard_limit_s,
            rtc_configuration=rtc,
            server_rtc_configuration=rtc,
            verbose=False,
        )
        self._ui_stream: Any = None
        for channel in ("web", "api", "phone"):
            self.metrics.track_active(channel, lambda c=channel: self.active(c))  # type: ignore[misc]
        self.metrics.track_lines(self.free_lines, self.limit, lambda: self.draining)
        app.state.__dict__.setdefault("voicebot_services", []).append(self)

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
        """Load (or share) the backend, run the time-limit watchdog and the dependency checks;
        on exit, end every call still running (recorded), then undo the rest."""
        import httpx

        self._loop = asyncio.get_running_loop()
        self.backend = await self._shared.acquire()
        self._turn_log = self._shared.turn_log
        from voicebot.store import PostgresTurnStore

        store = self.backend.runtime.store
        if isinstance(store, PostgresTurnStore):
            self.metrics.track_turns_lost(lambda: store.lost_turns)
        self._http = httpx.AsyncClient(timeout=DEPENDENCY_TIMEOUT_S)
        await self.refresh_readiness()
        tasks = [
            asyncio.create_task(self._watch_time_limits()),
            asyncio.create_task(self._watch_dependencies()),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._cut_calls()
            await self._http.aclose()
            self._turn_log = None
            self.backend = None
            await self._shared.release()

    @property
    def turn_log(self) -> TurnLog | None:
        """The turn log's reads and live feed (``voicebot.store.TurnLog``), or None without one."""
        return self._turn_log

    @property
    def runtime(self) -> Runtime:
        if self.backend is None:
            raise RuntimeError("voicebot is not started: run the app with its lifespan")
        return self.backend.runtime

    @property
    def hard_limit_s(self) -> float | None:
        """When a call is cut whatever happens: the time limit plus the goodbye's grace."""
        limit = self.settings.time_limit_s
        return None if limit is None else limit + min(GOODBYE_GRACE_S, limit)

    # -- handlers

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
            service=self,
            channel=channel,
            persona=persona if persona in self.runtime.stacks else None,
            persona_from_ui=persona_from_ui,
            caller_ref=caller_ref,
            observer=self.metrics,
        )
        return handler

    def prototype(self, channel: Channel, *, from_ui: bool) -> Any:
        """A FastRTC handler for a stream on ``channel``: each connection gets a ``copy()``."""
        return self._prototype_class(self, channel, from_ui)

    def call_started(self, handler: VoiceHandler) -> None:
        with self._calls_lock:
            self._calls[id(handler)] = (handler, handler.channel_kind, time.monotonic())
        self.metrics.call_started(handler.channel_kind)

    def call_ended(self, handler: VoiceHandler) -> None:
        with self._calls_lock:
            self._calls.pop(id(handler), None)
            self._ending.discard(id(handler))

    def calls_in_progress(self) -> int:
        """Handlers started and not yet shut down."""
        with self._calls_lock:
            return len(self._calls)

    def _started_handlers(self) -> list[VoiceHandler]:
        with self._calls_lock:
            return [handler for handler, _, _ in self._calls.values()]

    # -- lines

    @property
    def ui_stream(self) -> Any:
        """The page's FastRTC stream (``app`` sets it); its offers go through our lines."""
        return self._ui_stream

    @ui_stream.setter
    def ui_stream(self, stream: Any) -> None:
        from voicebot.server.rtc_signalling import guard_component_offers

        self._ui_stream = stream
        component = getattr(stream, "webrtc_component", None)
        if component is not None:

            async def admit(mixin: Any, body: Any, set_outputs: Any, original: Any) -> Any:
                reply = await self.answer_offer(mixin, "web", body, set_outputs, answer=original)
                return reply.body

            guard_component_offers(component, admit)

    def free_lines(self) -> int:
        """Lines a new call could take now (0 while draining)."""
        return 0 if self._draining else self.lines.free()

    def active(self, channel: Channel | None = None) -> int:
        """Calls holding a line (connecting ones included), on one channel or all."""
        return self.lines.active(channel)

    def admit(self, channel: Channel, key: str, *, count_refusal: bool = True) -> Line | None:
        """A line for a new call, or None (counted as rejected) when full or draining."""
        line = None if self._draining else self.lines.take(channel, key)
        if line is None and count_refusal:
            self.metrics.call_rejected(channel, "draining" if self._draining else "busy")
        return line

    def try_acquire(self, channel: Channel) -> bool:
        """``telephony.Slots``: a line for a phone call, released with ``release``."""
        # PhoneCall reports its own refusals (on_reject).
        line = self.admit(channel, f"{channel}:{next(self._phone_numbers)}", count_refusal=False)
        if line is None:
            return False
        with self._calls_lock:
            self._phone_lines.append(line)
        return True

    def release(self, channel: Channel) -> None:
        with self._calls_lock:
            line = next((x for x in self._phone_lines if x.channel == channel), None)
            if line is not None:
                self._phone_lines.remove(line)
        if line is not None:
            line.release()

    def resume_refusal(
        self, conversation_id: str | uuid.UUID, persona: str, channel: Channel
    ) -> str | None:
        """Why a call may not continue ``conversation_id`` (None: it may); the policy is
        ``access.resume_refusal``. Blocking: call it from the call's thread, not the loop."""
        from voicebot.server.access import resume_refusal

        try:
            cid = uuid.UUID(str(conversation_id))
        except ValueError:
            return "not a conversation id"
        if self._turn_log is None or self._loop is None:
            return "no turn log"
        try:
            found = asyncio.run_coroutine_threadsafe(
                self._stored_conversation(cid), self._loop
            ).result(timeout=RESUME_LOOKUP_S)
        except Exception as e:  # the turn log cannot say: do not continue
            return f"the turn log did not answer ({type(e).__name__})"
        return resume_refusal(found, persona=persona, channel=channel)

    async def _stored_conversation(self, cid: uuid.UUID) -> Any:
        from voicebot.server.access import StoredConversation

        assert self._turn_log is not None  # checked by the caller
        found = await self._turn_log.conversation(cid, 1)
        if found is None:
            return None
        return StoredConversation(found.persona, found.channel)

    def refusal_body(self) -> dict[str, Any]:
        """What a refused caller hears: the busy answer, or that this replica is draining."""
        if self._draining:
            return {
                "status": "failed",
                "meta": {"error": "server_draining", "limit": self.limit},
                "detail": "this server is shutting down; call again to reach another one",
            }
        return self.busy_body()

    def busy_body(self) -> dict[str, Any]:
        return {
            "status": "failed",
            "meta": {"error": "concurrency_limit_reached", "limit": self.limit},
            "detail": f"all {self.limit} lines are busy; try again in a few minutes",
        }

    def has_call(self, call_id: str) -> bool:
        """Whether ``call_id`` (a FastRTC connection id or a Twilio streamSid) is live here."""
        from voicebot.server.rtc_signalling import connection_known

        return connection_known(self.stream, call_id) or call_id in self._phone_calls

    async def answer_offer(
        self,
        mixin: Any,
        channel: Channel,
        body: dict[str, Any],
        set_outputs: Callable[[Any], None],
        *,
        answer: Any = None,
    ) -> OfferReply:
        """Check a WebRTC offer, take a line for it, let FastRTC answer; the line is given back
        when the connection ends (or at once when the offer fails)."""
        from voicebot.server import rtc_signalling as rtc

        try:
            kind = rtc.check_offer(body)
        except rtc.OfferError as e:
            self.metrics.call_rejected(channel, "invalid_offer")
            logger.warning("%s offer refused: %s", channel, e)
            return OfferReply(400, _failed("invalid_offer", str(e)))
        if kind == "ice-candidate":
            if not rtc.connection_known(mixin, body["webrtc_id"]):
                return OfferReply(404, _failed("unknown_connection", "no such connection"))
            return OfferReply(200, await (answer or mixin.handle_offer)(body, set_outputs))
        webrtc_id = body["webrtc_id"]
        key = f"{channel}:{webrtc_id}"
        if rtc.connection_known(mixin, webrtc_id) or self.lines.holds(key):
            self.metrics.call_rejected(channel, "duplicate")
            return OfferReply(
                409, _failed("connection_already_exists", f"webrtc_id {webrtc_id} is in use")
            )
        line = self.admit(channel, key)
        if line is None:  # a full server says so whatever the offer holds
            return OfferReply(503, self.refusal_body())
        try:
            rtc.check_sdp(body)
        except rtc.OfferError as e:
            line.release()
            self.metrics.call_rejected(channel, "invalid_offer")
            logger.warning("%s offer refused: %s", channel, e)
            return OfferReply(400, _failed("invalid_offer", str(e)))
        line.hang_up = lambda: rtc.close_connection(mixin, webrtc_id)
        loop = asyncio.get_running_loop()

        def on_closed(handler: Any) -> None:
            task = loop.create_task(self._end_call(line, handler))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            reply = await rtc.answer_offer(
                mixin,
                body,
                set_outputs,
                on_closed=on_closed,
                answer=answer,
                low_latency=self.settings.rtc_low_latency,
            )
        except rtc.OfferError as e:
            line.release()
            self.metrics.call_rejected(channel, "invalid_offer")
            logger.warning("%s offer %s failed: %s", channel, webrtc_id, e)
            return OfferReply(400, _failed("invalid_offer", str(e)))
        except BaseException:
            line.release()
            await rtc.discard(mixin, webrtc_id)
            raise
        return OfferReply(200, reply)

    async def serve_websocket(self, websocket: Any) -> None:
        """One ``/websocket/offer`` call: its line is taken now, before ``start``."""
        from voicebot.server import rtc_signalling as rtc

        line = self.admit("api", f"ws:{id(websocket)}")
        if line is None:
            await websocket.accept()
            await websocket.send_json(self.refusal_body())
            await websocket.close(code=1013)
            return
        stop = asyncio.Event()

        async def hang_up() -> None:
            stop.set()

        line.hang_up = hang_up
        handler: Any = None
        try:
            handler = self.new_handler("api")
            limit = self.settings.time_limit_s
            start_timeout = min(WEBSOCKET_START_TIMEOUT_S, limit or WEBSOCKET_START_TIMEOUT_S)
            await rtc.serve_websocket(
                self.stream,
                websocket,
                handler,
                start_timeout_s=start_timeout,
                hard_limit_s=self.hard_limit_s,
                stop=stop,
            )
        finally:
            await self._end_call(line, handler)

    async def _end_call(self, line: Line, handler: Any) -> None:
        """Shut the call's handler down (idempotent), then give its line back."""
        try:
            if handler is not None:
                await asyncio.to_thread(handler.shutdown)
        except Exception:
            logger.exception("ending call %s", line.key)
        finally:
            line.release()

    # -- phone calls

    def phone_call_started(self, stream_sid: str) -> None:
        self._phone_calls.add(stream_sid)

    def phone_call_ended(self, stream_sid: str) -> None:
        self._phone_calls.discard(stream_sid)

    def has_phone_call(self, stream_sid: str) -> bool:
        return stream_sid in self._phone_calls

    def busy_line(self, persona: str | None) -> tuple[str, Any]:
        """The busy message of a persona and the voice to say it in."""
        stack = self.runtime.stack(persona)
        return stack.persona.busy_message, stack.synthesizer

    # -- time limits

    async def _watch_time_limits(self) -> None:
        """Say the persona's goodbye to every call over its time limit."""
        limit = self.settings.time_limit_s
        if limit is None:
            return
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            with self._calls_lock:
                due = [
                    (key, handler)
                    for key, (handler, _, started) in self._calls.items()
                    if key not in self._ending and now - started >= limit
                ]
                self._ending.update(key for key, _ in due)
            for _, handler in due:
                logger.info("call %s reached its time limit", handler.conversation_id)
                await asyncio.to_thread(handler.end_call, _goodbye(handler))

    # -- readiness

    def readiness(self) -> Readiness:
        """Ready, or why not, from cached state: costs no request to anything."""
        checks = dict(self._checks)
        status: ReadyStatus
        if self._draining:
            status = "draining"
        elif self.backend is None or self._checked_at is None:
            status = "starting"
        elif any(c.required and not c.ok for c in checks.values()):
            status = "unavailable"
        elif self.lines.free() == 0:
            status = "full"
        else:
            status = "ready"
        return Readiness(status, self.free_lines(), self.limit, checks, self._checked_at)

    async def refresh_readiness(self) -> None:
        """Check the dependencies now (the background task does this every few seconds)."""
        self._checks = await self._check_dependencies()
        self._checked_at = time.monotonic()

    async def _watch_dependencies(self) -> None:
        while True:
            await asyncio.sleep(READINESS_REFRESH_S)
            try:
                await self.refresh_readiness()
            except Exception:
                logger.exception("dependency check failed")

    async def _check_dependencies(self) -> dict[str, Check]:
        import httpx

        backend = self.backend
        checks = {
            "models": Check(
                backend is not None,
                ", ".join(backend.runtime.stacks) if backend is not None else "not loaded",
            )
        }
        # The LLM server the settings choose: Ollama's version route, or the OpenAI-protocol
        # server's model list (vLLM, llama-server, LiteLLM …).
        if self.settings.llm_backend == "openai":
            host = self.settings.openai_base_url.rstrip("/")
            probe = f"{host}/models"
        else:
            host = self.settings.ollama_host.rstrip("/")
            probe = f"{host}/api/version"
        previous = self._checks.get("ollama")
        try:
            reply = await self._http.get(probe)
            checks["ollama"] = Check(reply.status_code == 200, f"{host}: {reply.status_code}")
        except httpx.HTTPError as e:
            checks["ollama"] = Check(False, f"{host}: {type(e).__name__}")
        turn_log = self._turn_log
        if turn_log is None:
            checks["database"] = Check(backend is not None, "no turn log configured", False)
        elif await turn_log.ping(DEPENDENCY_TIMEOUT_S):
            checks["database"] = Check(True, "reachable", False)
        else:
            checks["database"] = Check(False, "unreachable (spooling)", False)
        for name, check in checks.items():
            before = self._checks.get(name) if name != "ollama" else previous
            if before is not None and before.ok != check.ok:
                log = logger.info if check.ok else logger.warning
                log("dependency %s is %s: %s", name, "back" if check.ok else "down", check.detail)
        return checks

    # -- draining

    @property
    def draining(self) -> bool:
        """True once ``begin_drain`` ran: no new call is admitted, /readyz answers 503."""
        return self._draining

    def begin_drain(self) -> None:
        """Stop admitting calls now (idempotent); calls in progress go on."""
        if not self._draining:
            self._draining = True
            logger.info("draining: no new calls; %d in progress", self.lines.active())

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting, let calls finish for up to ``timeout_s``, then end the rest with the
        persona's goodbye (every turn recorded); returns when no line is held (or given up)."""
        self.begin_drain()
        if not await _wait_for(lambda: self.lines.active() == 0, timeout_s):
            handlers = self._started_handlers()
            logger.info("drain timeout: saying goodbye to %d calls", len(handlers))
            with self._calls_lock:
                self._ending.update(id(h) for h in handlers)
            await asyncio.gather(
                *(asyncio.to_thread(h.end_call, _goodbye(h)) for h in handlers),
                return_exceptions=True,
            )
            if not await _wait_for(lambda: self.lines.active() == 0, DRAIN_GOODBYE_S):
                await self._cut_calls()
        logger.info("drained")

    async def _cut_calls(self) -> None:
        """End every call now: close its connection, shut its handler down."""
        lines = self.lines.held()
        handlers = self._started_handlers()
        if not lines and not handlers:
            return
        logger.info("cutting %d calls", max(len(lines), len(handlers)))
        await asyncio.gather(
            *(line.hang_up() for line in lines if line.hang_up is not None),
            return_exceptions=True,
        )
        await asyncio.gather(
            *(asyncio.to_thread(h.shutdown) for h in handlers), return_exceptions=True
        )
        if not await _wait_for(lambda: self.lines.active() == 0, HANG_UP_WAIT_S):
            left = self.lines.held()
            logger.warning("%d lines still held after cutting: %s", len(left), left)
            for line in left:
                line.release()


def services_of(app: Any) -> list[VoiceService]:
    """The services mounted on ``app`` (what a server drains on SIGTERM)."""
    services: list[VoiceService] = app.state.__dict__.get("voicebot_services", [])
    return list(services)


def _goodbye(handler: Any) -> str:
    try:
        return str(handler.runtime.stack(handler.persona_name).persona.goodbye or "")
    except Exception:
        return ""


def _failed(error: str, detail: str) -> dict[str, Any]:
    return {"status": "failed", "meta": {"error": error}, "detail": detail}


async def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True
