"""The app: ``create_app()`` and ``mount(app)`` put the agent's routes, guard and lifespan on
a FastAPI app, with the Gradio page at ``/ui`` when asked for."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
from voicebot.server.service import GOODBYE_GRACE_S, BackendFactory, VoiceService
from voicebot.settings import Settings


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
    app.add_middleware(Guard, policy=guard_policy(service))
    install_log_redaction(log_secrets(settings))
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


def guard_policy(service: VoiceService) -> GuardPolicy:
    """The access rules of one mount."""
    return GuardPolicy(
        prefix=service.path,
        api_token=service.api_token,
        max_body_bytes=service.settings.max_body_bytes,
        twilio_signed=service.signature_checker is not None,
        on_reject=service.metrics.call_rejected,
    )


def _mount_ui(app: FastAPI, service: VoiceService) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from voicebot.app import select_personas
    from voicebot.ui import build_call_stream

    settings = service.settings
    # Persona choices are read from the files: the models are not loaded yet.
    choices = [(p.display_name, name) for name, p in select_personas(settings, None).items()]
    prototype = service.prototype("web", from_ui=True)
    hard_limit = None if settings.time_limit_s is None else settings.time_limit_s + GOODBYE_GRACE_S
    service.ui_stream = build_call_stream(
        prototype,
        choices,
        settings.persona,
        concurrency_limit=service.limit,
        time_limit=hard_limit,
        rtc_configuration=settings.rtc_configuration.as_dict()
        if settings.rtc_configuration
        else None,
    )
    gr.mount_gradio_app(app, service.ui_stream.ui, path=f"{service.path}/ui")


def create_app(
    settings: Settings | None = None, *, ui: bool = False, backend: BackendFactory | None = None
) -> FastAPI:
    """A FastAPI app serving the agent at the root; nothing loads until its lifespan starts."""
    settings = settings or Settings()
    check_exposure(settings)  # where `voicebot serve` binds; the guard checks each request too
    app = FastAPI(title="voicebot", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, "", settings=settings, ui=ui, backend=backend)
    return app
