"""One mount's state: its FastRTC streams, limits, metrics and the backend its lifespan loads.

Models load in the app's lifespan, once per app even when mounted twice with equal settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    from voicebot.app import build_runtime, open_turn_store

    with open_turn_store(settings) as store:
        yield Backend(build_runtime(settings, personas=personas, store=store), store.dsn)


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
        self._handler_class, self._prototype_class = _served_handler_classes()
        self._calls: dict[int, tuple[VoiceHandler, Channel, float]] = {}
        self._ending: set[int] = set()
        self._phone_active = 0
        self._phone_calls: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn_log: TurnLog | None = None
        prototype = self.prototype("api", from_ui=False)
        hard_limit = (
            None if settings.time_limit_s is None else settings.time_limit_s + GOODBYE_GRACE_S
        )
        # concurrency_limit and time_limit are always explicit: FastRTC's default means 1 call.
        rtc = settings.rtc_configuration.as_dict() if settings.rtc_configuration else None
        self.stream = Stream(
            prototype,
            modality="audio",
            mode="send-receive",
            concurrency_limit=self.limit,
            time_limit=hard_limit,
            rtc_configuration=rtc,
            server_rtc_configuration=rtc,
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
        self._loop = asyncio.get_running_loop()
        self.backend = await self._shared.acquire()
        self._turn_log = self._shared.turn_log
        from voicebot.store import PostgresTurnStore

        store = self.backend.runtime.store
        if isinstance(store, PostgresTurnStore):
            self.metrics.track_turns_lost(lambda: store.lost_turns)
        watchdog = asyncio.create_task(self._watch_time_limits())
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
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

    def busy_body(self) -> dict[str, Any]:
        return {
            "status": "failed",
            "meta": {"error": "concurrency_limit_reached", "limit": self.limit},
            "detail": f"all {self.limit} lines are busy; try again in a few minutes",
        }
