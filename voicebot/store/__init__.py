"""The turn log: conversations and turns recorded in PostgreSQL, off the audio path, none lost.

- ``writer``: ``PostgresTurnStore`` (the ``TurnStore`` the pipeline records into: a bounded
  queue, a writer thread, a spooler thread) and ``InMemoryTurnStore``.
- ``spool``: the local file records wait in while the database is unreachable.
- ``records``: the serialized form of a record and the SQL that writes it.
- ``queries``: every read (CLI, API, feed).
- ``feed``: live turns, one LISTEN connection per process fanned out in memory.
- ``turnlog``: ``TurnLog``, what a served app reads through (queries, ``subscribe``).
"""

from voicebot.store.feed import FeedFull, Subscription, TurnFeed, follow_stored_turns, follow_turns
from voicebot.store.queries import (
    ConversationDetail,
    ConversationSummary,
    StoredTurn,
    get_stored_turns,
    get_turns,
    list_conversations,
    prune,
)
from voicebot.store.records import (
    NOTIFY_CHANNEL,
    TURN_COLUMNS,
    Record,
    conversation_end_record,
    conversation_record,
    turn_record,
)
from voicebot.store.spool import Spool
from voicebot.store.turnlog import TurnLog
from voicebot.store.writer import InMemoryTurnStore, PostgresTurnStore, TurnStore

__all__ = [
    "NOTIFY_CHANNEL",
    "TURN_COLUMNS",
    "ConversationDetail",
    "ConversationSummary",
    "FeedFull",
    "InMemoryTurnStore",
    "PostgresTurnStore",
    "Record",
    "Spool",
    "StoredTurn",
    "Subscription",
    "TurnFeed",
    "TurnLog",
    "TurnStore",
    "conversation_end_record",
    "conversation_record",
    "follow_stored_turns",
    "follow_turns",
    "get_stored_turns",
    "get_turns",
    "list_conversations",
    "prune",
    "turn_record",
]
