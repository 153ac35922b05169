"""Serving the agent: ``create_app()`` and ``mount(app)`` for FastAPI, with what FastRTC lacks.

Routes under the mount path (``""`` for ``create_app``):

- ``POST /webrtc/offer``, ``WS /websocket/offer``: FastRTC's WebRTC and websocket transports
  (``routes.rtc``).
- ``POST /telephone/incoming``, ``WS /telephone/handler``: Twilio (``routes.phone``,
  ``voicebot.telephony``).
- ``GET /api/personas``, ``/api/conversations``, ``/api/conversations/{id}``,
  ``/api/conversations/{id}/events`` (SSE from the turn log's LISTEN/NOTIFY feed, any process),
  ``/api/calls/{call_id}/events`` (SSE of one live connection by its FastRTC id / streamSid)
  (``routes.api``).
- ``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus text) (``routes.health``).
- ``/ui``: the Gradio page, when asked for (``app``).

Access (``access``): with ``VOICEBOT_API_TOKEN`` set, every route but ``/healthz`` and
``/readyz`` needs ``Authorization: Bearer <token>`` (or ``?token=`` for websockets and the page,
which then sets a cookie); Twilio's routes need a valid ``X-Twilio-Signature`` instead when
``TWILIO_AUTH_TOKEN`` is set. Without a token the server only runs bound to loopback.

Models load in the app's lifespan, once per app even when mounted twice with equal settings
(``service``).
"""

from __future__ import annotations

from voicebot.server.access import RedactTokenFilter, check_exposure, is_loopback
from voicebot.server.app import create_app, mount
from voicebot.server.service import Backend, BackendFactory, VoiceService, default_backend

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
