"""What one process shares across all calls: loaded models, personas and the turn store.

Built once at the composition root (``voicebot.app.build_runtime``) and handed to every call's
stream handler; nothing in here is per connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from voicebot.acknowledgement import AcknowledgementAudio
from voicebot.conversation import utc_now
from voicebot.endpointing import TurnEndModel
from voicebot.llm import ChatModel
from voicebot.pace import ReplyPace
from voicebot.personas import Persona
from voicebot.stt import Transcriber
from voicebot.tts import Synthesizer
from voicebot.turns import TurnConfig
from voicebot.vad import VoiceActivityModel

if TYPE_CHECKING:
    from voicebot.reservations.book import ReservationBook
    from voicebot.store import TurnStore


@dataclass(frozen=True)
class PersonaStack:
    """A persona with the models that serve it."""

    persona: Persona
    transcriber: Transcriber
    chat: ChatModel
    synthesizer: Synthesizer
    acknowledgement: AcknowledgementAudio = field(
        default_factory=AcknowledgementAudio, compare=False, repr=False
    )
    """The persona's acknowledgement audio, made once and shared by every call."""
    pace: ReplyPace = field(default_factory=ReplyPace, compare=False, repr=False)
    """How fast its voice and model are, measured on every call's replies: how short a
    reply's first chunk may be."""


@dataclass(frozen=True)
class Runtime:
    """Process-wide collaborators for the stream handler."""

    vad: VoiceActivityModel
    stacks: Mapping[str, PersonaStack]
    turn_config: TurnConfig
    default_persona: str
    store: TurnStore | None = None
    turn_end: TurnEndModel | None = None
    """Whether the user's turn sounds finished (None: silence timing alone); shared by calls."""
    turn_end_executor: Executor | None = None
    """Where ``turn_end`` runs, beside the audio: ``TurnDetector(..., turn_end, executor)``."""
    reservations: ReservationBook | None = None
    """The bookings the reservation tools write (None without a database: they say so)."""
    wall_clock: Callable[[], datetime] = utc_now
    """Today's date for the system prompt and the tools (tests fix it)."""

    def stack(self, persona_name: str | None) -> PersonaStack:
        """The stack for a persona name, falling back to the default persona."""
        if persona_name and persona_name in self.stacks:
            return self.stacks[persona_name]
        return self.stacks[self.default_persona]
