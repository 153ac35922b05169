"""What the call is doing now, as the page shows it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CallState = Literal["listening", "user_speaking", "thinking", "speaking", "paused", "closing", "error"]


@dataclass(frozen=True)
class CallStatus:
    """Sent to the page (as FastRTC ``AdditionalOutputs``) each time the call's state changes."""

    state: CallState
    detail: str | None = None
    """For ``error``: what went wrong and how to fix it, in the persona's language."""
