"""The call's FastRTC stream handler (kept here for the server, the CLI and the bench).

The call itself lives in ``voicebot.call`` (policy, reply, playout, independent of the
transport); ``voicebot.transports.fastrtc`` adapts it to FastRTC. See docs/architecture.md.
"""

from __future__ import annotations

from voicebot.call.events import TurnUpdate
from voicebot.call.playout import FRAME_S, FRAME_SAMPLES, OUTPUT_RATE, PLAYBACK_LEAD_S
from voicebot.call.record import CallObserver
from voicebot.transports.fastrtc import EMIT_WAIT_S, VoiceHandler

__all__ = [
    "EMIT_WAIT_S",
    "FRAME_S",
    "FRAME_SAMPLES",
    "OUTPUT_RATE",
    "PLAYBACK_LEAD_S",
    "CallObserver",
    "TurnUpdate",
    "VoiceHandler",
]
