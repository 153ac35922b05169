"""The app: ``create_app()`` and ``mount(app)`` put the agent's routes, guard and lifespan on
a FastAPI app, with the Gradio page at ``/ui`` when asked for; ``create_page_app()`` serves
the page alone (``voicebot ui``) through the same service, guard and drain."""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from voicebot.errors import ConfigError
from voicebot.reservations.api import reservations_router
from voicebot.server.access import (
    Guard,
    GuardPolicy,
    check_exposure,
    install_log_redaction,
    log_secrets,
)
from voicebot.server.routes import api, health, phone, rtc
from voicebot.server.service import BackendFactory, VoiceService
from voicebot.settings import Settings

if TYPE_CHECKING:
    from voicebot.conversation import Turn
    from voicebot.store import ConversationSummary
    from voicebot.ui import ConversationLog


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

    Without ``VOICEBOT_API_TOKEN`` the mount answers only requests that reach it on loopback,
    from loopback, not through a proxy (the host app's own bind address decides what that
    is, not ``settings.host``). Log records of the process are redacted of the token.
    """
    settings = settings or Settings()
    path = path.rstrip("/")
    if path and not path.startswith("/"):
        raise ConfigError(f"mount path must start with '/': {path!r}")
    service = VoiceService(app, settings, path=path, backend=backend)
    for routes in (rtc, phone, api, health):
        app.include_router(routes.build_router(service))
    app.include_router(reservations_router(lambda: service.turn_log, prefix=service.path))
    _guard_and_run(app, service, page_path="/ui")
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if ui:
        _mount_page(app, service, f"{service.path}/ui")
    return service


def create_page_app(
    settings: Settings | None = None,
    *,
    backend: BackendFactory | None = None,
    conversation_log: bool = True,
) -> FastAPI:
    """The page alone, at the root (``voicebot ui``): the same service, guard, lines, resume
    rule and drain as ``create_app(ui=True)``'s ``/ui``, and no other route.

    ``conversation_log``: show the recent conversations (needs the backend's turn store)."""
    settings = settings or Settings()
    check_exposure(settings)
    app = FastAPI(title="voicebot", docs_url=None, redoc_url=None, openapi_url=None)
    service = VoiceService(app, settings, path="", backend=backend)
    _guard_and_run(app, service, page_path="/")
    _mount_page(app, service, "/", conversation_log=conversation_log)
    return app


def guard_policy(service: VoiceService, *, page_path: str = "/ui") -> GuardPolicy:
    """The access rules of one mount; ``page_path``: where the page is, inside the mount."""
    return GuardPolicy(
        prefix=service.path,
        api_token=service.api_token,
        max_body_bytes=service.settings.max_body_bytes,
        twilio_signed=service.signature_checker is not None,
        cookie_paths=(page_path,),
        on_reject=service.metrics.call_rejected,
    )


def _guard_and_run(app: FastAPI, service: VoiceService, *, page_path: str) -> None:
    """Put the mount's guard on ``app`` and run its service in the app's lifespan."""
    app.add_middleware(Guard, policy=guard_policy(service, page_path=page_path))
    install_log_redaction(log_secrets(service.settings))
    previous = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with previous(a) as state, service.running():
            yield state

    app.router.lifespan_context = lifespan


class _StoredConversations:
    """The page's conversation log: the turn store of the service's backend, once loaded."""

    def __init__(self, service: VoiceService) -> None:
        self._service = service

    def _store(self) -> ConversationLog | None:
        backend = self._service.backend
        store = backend.runtime.store if backend is not None else None
        if store is None or not hasattr(store, "conversations"):
            return None  # not started yet, or a store that only writes
        log: ConversationLog = store  # type: ignore[assignment]
        return log

    def conversations(self, limit: int = 20) -> list[ConversationSummary]:
        store = self._store()
        return [] if store is None else store.conversations(limit)

    def recent_turns(self, conversation_id: uuid.UUID, limit: int) -> list[Turn]:
        store = self._store()
        return [] if store is None else store.recent_turns(conversation_id, limit)


def _mount_page(
    app: FastAPI, service: VoiceService, path: str, *, conversation_log: bool = True
) -> None:
    """The Gradio page at ``path``: its calls are the service's (lines, resume rule, drain)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from voicebot.app import select_personas
    from voicebot.ui import build_call_stream, build_page

    settings = service.settings
    # Persona choices are read from the files: the models are not loaded yet.
    personas = select_personas(settings, None)
    service.ui_stream = build_call_stream(
        service.prototype("web", from_ui=True),
        [(p.display_name, name) for name, p in personas.items()],
        settings.persona,
        concurrency_limit=service.limit,
        time_limit=service.hard_limit_s,
        languages={name: p.language for name, p in personas.items()},
        rtc_configuration=settings.rtc_configuration.as_dict()
        if settings.rtc_configuration
        else None,
    )
    log = _StoredConversations(service) if conversation_log else None
    page = build_page(service.ui_stream, log, list(personas))
    # mount_gradio_app prints "new <path>" on stdout: keep our start-up output to our lines.
    with contextlib.redirect_stdout(io.StringIO()):
        gr.mount_gradio_app(app, page, path=path, show_api=False)


def create_app(
    settings: Settings | None = None, *, ui: bool = False, backend: BackendFactory | None = None
) -> FastAPI:
    """A FastAPI app serving the agent at the root; nothing loads until its lifespan starts."""
    settings = settings or Settings()
    check_exposure(settings)  # where `voicebot serve` binds; the guard checks each request too
    app = FastAPI(title="voicebot", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, "", settings=settings, ui=ui, backend=backend)
    return app
