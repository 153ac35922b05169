"""Errors raised by voicebot.

The tree is small on purpose::

    VoicebotError              base of everything we raise
    ├── ConfigError            at start-up: a setting, persona file or model is wrong;
    │                          the message says how to fix it
    └── StageError(stage)      during a turn: one pipeline stage failed (stt, llm, tts,
                               store); the call survives and the next turn works

Always raised ``from`` the underlying exception so the cause stays in the traceback.
"""

from __future__ import annotations


class VoicebotError(Exception):
    """Base class of all voicebot errors."""


class ConfigError(VoicebotError):
    """A setting, persona file or model is missing or invalid; the message says how to fix it."""


class StageError(VoicebotError):
    """A pipeline stage failed during a turn; ``stage`` names it (stt, llm, tts, store)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message
