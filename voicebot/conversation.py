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
    v2v_ms: end of the user's speech to the first audio of the answer out (never the
        acknowledgement).
    first_sound_ms: end of the user's speech to the first agent audio of any kind out: the
        persona's acknowledgement when it played, else the answer (then equal to ``v2v_ms``).
    bargein_stop_ms: start of the interrupting speech to the last agent audio out.
    """

    endpoint_ms: float | None = None
    stt_ms: float | None = None
    llm_ttft_ms: float | None = None
    llm_first_chunk_ms: float | None = None
    tts_first_ms: float | None = None
    v2v_ms: float | None = None
    first_sound_ms: float | None = None
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
    acknowledgement: str = ""
    """What the caller heard of the persona's acknowledgement ("Sure,"), played while the
    answer was not ready: ``assistant_text`` starts with it (it was said), the LLM's history
    leaves it out (the model would learn to repeat it)."""

    def history_messages(self) -> list[Message]:
        """The messages this turn contributes to the LLM's history window."""
        messages = [Message("user", self.user_text)] if self.user_text else []
        answer = self.assistant_text
        if self.acknowledgement and answer.startswith(self.acknowledgement):
            answer = answer[len(self.acknowledgement) :].lstrip()
        if answer:
            suffix = " [interrupted by the user]" if self.interrupted else ""
            messages.append(Message("assistant", answer + suffix))
        return messages


def turn_dict(turn: Turn) -> dict[str, Any]:
    """The one JSON form of a turn: the API and its SSE events, ``simulate --json``,
    ``history --json`` and the bench all use it, and the turn log's columns follow the same
    ``TIMING_FIELDS`` (every timing is always present, ``None`` when its stage did not run).
    The turn's number is ``turn``, as ``simulate --json`` has always printed it."""
    return {
        "turn": int(turn.sequence),
        "turn_id": str(turn.turn_id),
        "conversation_id": str(turn.conversation_id),
        "user_text": turn.user_text,
        "assistant_text": turn.assistant_text,
        "interrupted": bool(turn.interrupted),
        "error": turn.error,
        "timings": {name: _ms(getattr(turn.timings, name)) for name in TIMING_FIELDS},
        "models": {"stt": turn.stt_model, "llm": turn.llm_model, "tts": turn.tts_model},
        "started_at": turn.started_at.isoformat(),
        "ended_at": None if turn.ended_at is None else turn.ended_at.isoformat(),
        "acknowledgement": turn.acknowledgement,
        "tool_calls": [
            {
                "name": c.name,
                "arguments": c.arguments,
                "result": c.result,
                "tool_ms": _ms(c.tool_ms),
                "error": c.error,
            }
            for c in turn.tool_calls
        ],
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)  # numpy scalars are not JSON
