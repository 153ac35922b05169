"""voicebot: a local, real-time voice agent.

``create_app`` and ``mount`` (in ``voicebot.server``) are loaded on first use, so
``import voicebot`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voicebot.server import create_app, mount

__all__ = ["create_app", "mount"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from voicebot import server

        return getattr(server, name)
    raise AttributeError(f"module 'voicebot' has no attribute {name!r}")
