"""Typed values that travel between stages: chat messages, turns and their timings."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
Channel = Literal["web", "phone", "api", "simulate"]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Message:
    """One chat message as the LLM sees it."""

    role: Role
    content: str


@dataclass
class Timings:
    """Per-turn latencies in milliseconds; ``None`` when the stage did not run.

    endpoint_ms: end of the user's speech (last voiced VAD window) to the turn being closed.
    stt_ms: transcription time.
    llm_ttft_ms: LLM request sent to first token.
    llm_first_chunk_ms: LLM request sent to the first speakable chunk (what TTS waits for).
    tts_first_ms: first speakable chunk ready to its first audio.
    v2v_ms: end of the user's speech to the first reply audio sample out.
    bargein_stop_ms: start of the interrupting speech to the last agent audio out.
    """

    endpoint_ms: float | None = None
    stt_ms: float | None = None
    llm_ttft_ms: float | None = None
    llm_first_chunk_ms: float | None = None
    tts_first_ms: float | None = None
    v2v_ms: float | None = None
    bargein_stop_ms: float | None = None


TIMING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Timings))
"""The names of the per-turn timings, in order (turn log columns, bench metrics)."""


@dataclass(frozen=True)
class Conversation:
    """One call: who it talks to and through which channel."""

    conversation_id: uuid.UUID
    persona: str
    channel: Channel
    started_at: datetime = field(default_factory=utc_now)
    caller_ref: str | None = None


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool the model called during a turn, and how it went.

    arguments: what the model sent (JSON, as received; may be invalid for the tool).
    result: what the model was told (the tool's answer, or why the call failed).
    tool_ms: how long the tool ran; None when it never started (unknown tool, bad arguments).
    error: None when the tool answered; else "invalid_arguments", "unknown_tool", "timeout",
        "failed" or "cancelled".
    """

    name: str
    arguments: dict[str, Any]
    result: str
    tool_ms: float | None = None
    error: str | None = None


@dataclass
class Turn:
    """One user utterance and the agent's answer, as it was actually played."""

    conversation_id: uuid.UUID
    sequence: int
    user_text: str
    assistant_text: str = ""
    interrupted: bool = False
    error: str | None = None
    timings: Timings = field(default_factory=Timings)
    stt_model: str | None = None
    llm_model: str | None = None
    tts_model: str | None = None
    started_at: datetime = field(default_factory=utc_now)
    ended_at: datetime | None = None
    turn_id: uuid.UUID = field(default_factory=uuid.uuid4)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    """The tools the model called during this turn, in order."""

    def history_messages(self) -> list[Message]:
        """The messages this turn contributes to the LLM's history window."""
        messages = [Message("user", self.user_text)] if self.user_text else []
        if self.assistant_text:
            suffix = " [interrupted by the user]" if self.interrupted else ""
            messages.append(Message("assistant", self.assistant_text + suffix))
        return messages
