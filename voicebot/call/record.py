"""The conversation's record: its history window, its turn numbers, the turns it completed.

Owned by the policy thread. It numbers turns, stores each finished turn (turn log, metrics
observer, the page's final update), keeps the history the LLM sees, and opens and closes the
conversation in the turn log. It decides nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from voicebot.call.events import CallOutput, TurnUpdate
from voicebot.conversation import Channel, Conversation, Message, Turn, utc_now
from voicebot.runtime import PersonaStack, Runtime

logger = logging.getLogger(__name__)


class CallObserver(Protocol):
    """Hears about every finished turn (metrics); called on the policy thread, must not
    block."""

    def turn_finished(self, turn: Turn, channel: Channel) -> None: ...

    def llm_request_wasted(self, channel: Channel) -> None:
        """A preemptive reply's LLM request was dropped: the user went on."""
        ...


@dataclass
class CallSetup:
    """Who the call is with and what it continues; fixed once the call starts."""

    runtime: Runtime
    stack: PersonaStack
    conversation_id: uuid.UUID
    channel: Channel
    history: list[Message]
    sequence_start: int = 0
    greet: bool = True
    caller_ref: str | None = None


class ConversationRecord:
    """What the call has said so far, and where it is kept."""

    def __init__(
        self,
        setup: CallSetup,
        publish: Callable[[CallOutput], None],
        observer: CallObserver | None = None,
    ) -> None:
        self._setup = setup
        self._publish = publish
        self._observer = observer
        self.history = setup.history
        """The exchanges the LLM sees (the handler and the tools share this list)."""
        self.completed_turns: list[Turn] = []
        self._sequence = setup.sequence_start  # a resumed conversation numbers on

    def open(self) -> None:
        setup = self._setup
        store = setup.runtime.store
        if store is not None:
            store.open_conversation(
                Conversation(
                    setup.conversation_id,
                    setup.stack.persona.name,
                    setup.channel,
                    caller_ref=setup.caller_ref,
                )
            )

    def close(self) -> None:
        store = self._setup.runtime.store
        if store is None:
            return
        try:
            store.close_conversation(self._setup.conversation_id, utc_now())
        except Exception:  # the call is over either way
            logger.exception("call %s: could not store its end", self._setup.conversation_id)

    def number(self, turn: Turn) -> None:
        """Give a real turn the next number."""
        self._sequence += 1
        turn.sequence = self._sequence

    def unnumber(self, turn: Turn) -> None:
        """A numbered turn merged into the next one: that one takes its number."""
        if turn.sequence and turn.sequence == self._sequence:
            self._sequence -= 1

    def caption(self, turn: Turn, text: str) -> None:
        """What the page shows while a reply plays: the chunks started so far."""
        self._publish(TurnUpdate(_snapshot(turn, assistant_text=text), final=False))

    def llm_request_wasted(self) -> None:
        """A preemptive reply was dropped after its LLM request was sent (metrics)."""
        if self._observer is not None:
            try:
                self._observer.llm_request_wasted(self._setup.channel)
            except Exception:  # metrics must never end a call
                logger.exception("turn observer failed")

    def line_heard(self, played: str, caption: Turn | None) -> None:
        """A fixed line (greeting, goodbye) was said: it joins the history, not the log."""
        if played:
            self.history.append(Message("assistant", played))
        if caption is not None:
            self._publish(TurnUpdate(_snapshot(caption, assistant_text=played), final=True))

    def turn_done(self, turn: Turn) -> None:
        """Store a finished turn: history, turn log, metrics, the page."""
        turn.ended_at = utc_now()
        self.history.extend(turn.history_messages())
        self.completed_turns.append(turn)
        store = self._setup.runtime.store
        if store is not None:
            try:
                store.record(turn)
            except Exception:  # the call goes on; the store logs its own failures too
                logger.exception("turn %d could not be stored", turn.sequence)
        if self._observer is not None:
            try:
                self._observer.turn_finished(turn, self._setup.channel)
            except Exception:  # metrics must never end a call
                logger.exception("turn observer failed")
        self._publish(TurnUpdate(_snapshot(turn), final=True))


def _snapshot(turn: Turn, assistant_text: str | None = None) -> Turn:
    """A copy for the transport, so later changes on the policy thread do not show through."""
    text = turn.assistant_text if assistant_text is None else assistant_text
    return replace(
        turn,
        timings=replace(turn.timings),
        assistant_text=text,
        tool_calls=list(turn.tool_calls),
    )
