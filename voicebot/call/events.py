"""The typed events the call's policy consumes, and the outputs a call hands its transport.

Each event says who sent it. Every event goes onto the one queue the policy thread reads;
nothing else decides anything about the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from voicebot.audio import Samples
from voicebot.call.status import CallStatus
from voicebot.conversation import ToolCallRecord, Turn
from voicebot.turns import TurnEvent

# --- inputs (onto the policy's queue) ----------------------------------------------------------


@dataclass(frozen=True)
class AudioIn:
    """Transport thread: one input frame went through the turn detector."""

    at: float
    samples_seen: int
    """16 kHz samples the detector has consumed, this frame included."""
    utterance_samples: int
    """How long the current utterance has lasted (0 when the user is silent)."""
    speaking: bool
    """Whether the user is inside an utterance after this frame."""
    turn_events: tuple[TurnEvent, ...] = ()


@dataclass(frozen=True)
class Transcribed:
    """Transcription worker: request ``request`` is done (``error`` set when it failed), or,
    with ``draft``, its quick draft is in and the real transcript is on its way."""

    request: int
    text: str
    error: Exception | None
    at: float
    draft: bool = False


@dataclass(frozen=True)
class ChunkReady:
    """Reply producer: chunk ``index`` of reply ``reply`` goes to TTS (sent before its audio)."""

    reply: int
    index: int
    text: str


@dataclass(frozen=True)
class ChunkPlaying:
    """Playout: the first frame of a chunk was handed to the transport at ``at``."""

    reply: int
    index: int
    at: float


@dataclass(frozen=True)
class PlayoutDrained:
    """Playout: the last queued frame of ``reply`` was handed out."""

    reply: int
    at: float


@dataclass(frozen=True)
class ReplyProduced:
    """Reply stages: everything is synthesized (or given up); no more audio will come."""

    reply: int


@dataclass(frozen=True)
class StageFailed:
    """Reply stages: a stage failed; the reply goes on with the persona's apology."""

    reply: int
    stage: str
    error: str


@dataclass(frozen=True)
class ToolRunning:
    """Reply producer: the model called tool ``name``; the reply waits for it."""

    reply: int
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolDone:
    """Reply producer: a tool call ended (answered, refused, failed, timed out, cancelled)."""

    reply: int
    record: ToolCallRecord


@dataclass(frozen=True)
class AcknowledgementDue:
    """Reply stages: the answer's audio may be late; ``audio`` (the persona's acknowledgement,
    at the playout's rate) could be said first. The policy decides."""

    reply: int
    audio: Samples


@dataclass(frozen=True)
class Tick:
    """Timer: the policy's periodic check (transport alive?)."""

    at: float


@dataclass(frozen=True)
class EndRequested:
    """Server (time limit) or user code: say ``message``, then close the call."""

    message: str


@dataclass(frozen=True)
class HangUp:
    """Transport or server: the call is over now (client gone, server stopping)."""

    reason: str


CallEvent = (
    AudioIn
    | Transcribed
    | ChunkReady
    | ChunkPlaying
    | PlayoutDrained
    | ReplyProduced
    | StageFailed
    | ToolRunning
    | ToolDone
    | AcknowledgementDue
    | Tick
    | EndRequested
    | HangUp
)

# --- outputs (to the transport) ----------------------------------------------------------------


@dataclass
class TurnUpdate:
    """What the UI shows for a turn: sent as FastRTC ``AdditionalOutputs``."""

    turn: Turn
    final: bool


@dataclass(frozen=True)
class AudioOut:
    """20 ms of agent audio, due now."""

    rate: int
    samples: Samples


@dataclass(frozen=True)
class CloseCall:
    """The call has said its last words: the transport hangs up."""

    message: str


CallOutput = AudioOut | TurnUpdate | CallStatus | CloseCall
