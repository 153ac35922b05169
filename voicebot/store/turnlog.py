"""The turn log as a served app reads it: a small async pool for queries and one live feed.

A service creates one ``TurnLog(dsn)`` per process, ``await start()`` in its lifespan and
``await close()`` at the end. Every method raises ``StageError("store", ...)`` when the database
cannot answer (the API's 503); ``subscribe`` also raises ``FeedFull`` at the subscriber cap.
PostgreSQL connections per process: at most ``pool_size`` (``application_name`` voicebot-api)
plus one listening connection (voicebot-feed), whatever the number of subscribers.
"""

from __future__ import annotations

import logging
from secrets import token_hex
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool

from voicebot.errors import StageError
from voicebot.store.feed import MAX_SUBSCRIBERS, Subscription, TurnFeed
from voicebot.store.queries import (
    MAX_TURNS,
    ConversationDetail,
    ConversationSummary,
    list_conversations_async,
    ping_async,
    read_conversation_async,
    shared_secret_async,
)

logger = logging.getLogger(__name__)


class TurnLog:
    """Conversations, their turns and live turns, for the API (see the module)."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        timeout_s: float = 5.0,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=0,
            max_size=pool_size,
            open=False,
            timeout=timeout_s,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(2, round(timeout_s)),
                "application_name": "voicebot-api",
            },
            name="voicebot-api",
        )
        self._caller_salt: bytes | None = None
        self.feed = TurnFeed(
            self._listen_connection,
            lambda: self._pool.connection(timeout=self._timeout_s),
            max_subscribers=max_subscribers,
        )

    async def _listen_connection(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._dsn,
            autocommit=True,
            connect_timeout=max(2, round(self._timeout_s)),
            application_name="voicebot-feed",
        )

    async def start(self) -> None:
        """Open the pool without waiting for the database, and start listening."""
        await self._pool.open(wait=False)
        self.feed.start()

    async def close(self) -> None:
        await self.feed.stop()
        await self._pool.close()

    async def conversations(self, limit: int = 20) -> list[ConversationSummary]:
        """The latest conversations, newest first (``limit`` clamped to 0..500)."""
        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                return await list_conversations_async(conn, max(0, min(limit, 500)))
        except psycopg.Error as e:
            raise StageError("store", f"cannot list conversations: {e}") from e

    async def conversation(
        self, conversation_id: UUID, limit: int = 1000
    ) -> ConversationDetail | None:
        """A conversation with its first ``limit`` turns (clamped to 0..10000); None when
        unknown."""
        try:
            async with self._pool.connection(timeout=self._timeout_s) as conn:
                return await read_conversation_async(
                    conn, conversation_id, max(0, min(limit, MAX_TURNS))
                )
        except psycopg.Error as e:
            raise StageError("store", f"cannot read conversation {conversation_id}: {e}") from e

    async def subscribe(self, conversation_id: UUID, backlog: int = 0) -> Subscription:
        """Live turns of one conversation (see ``TurnFeed.subscribe``)."""
        return await self.feed.subscribe(conversation_id, max(0, backlog))

    async def caller_salt(self) -> bytes:
        """The caller-hash salt shared by every replica on this database (created once)."""
        if self._caller_salt is None:
            try:
                async with self._pool.connection(timeout=self._timeout_s) as conn:
                    value = await shared_secret_async(conn, "caller_hash_salt", token_hex(32))
            except psycopg.Error as e:
                raise StageError("store", f"cannot read the caller-hash salt: {e}") from e
            self._caller_salt = value.encode()
        return self._caller_salt

    def connection(self) -> Any:
        """A pooled async connection (``async with``) for reads that live beside the turn
        log, such as the reservations route."""
        return self._pool.connection(timeout=self._timeout_s)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """Whether the database answers within ``timeout_s`` (for readiness)."""
        try:
            async with self._pool.connection(timeout=timeout_s) as conn:
                await ping_async(conn)
            return True
        except psycopg.Error:
            return False
