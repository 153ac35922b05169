"""Live turns from the turn log, recorded by any process: LISTEN/NOTIFY, fanned out in memory.

``TurnFeed`` holds ONE listening connection per process, however many clients watch: each
notification batch is fetched once on that connection and handed to every subscriber of its
conversation, so every subscriber gets every turn. Subscribers are capped (``FeedFull``, which
the API answers with 503); a subscriber too slow to keep up is ended rather than allowed to hold
memory. A conversation that has ended yields its turns and ends; one that ends while watched
ends its subscribers after its last turns. When the listening connection drops the feed
reconnects (logged once per outage) and catches its subscribers up on what they missed.

``follow_turns()`` is the one-subscriber form for another process (``voicebot history -f``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from voicebot.conversation import Turn
from voicebot.errors import StageError
from voicebot.store.queries import (
    StoredTurn,
    conversation_ended_async,
    fetch_conversation_turns,
    fetch_ids,
    fetch_latest,
    fetch_since,
)
from voicebot.store.records import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

MAX_SUBSCRIBERS = 1000
"""Live-transcript subscribers one process serves at once (each costs a queue, not a
connection)."""
SUBSCRIBER_QUEUE = 1000
"""Turns that may wait for one subscriber before it is judged too slow and ended."""


class FeedFull(StageError):
    """Every live-transcript slot of this process is taken; try again later (HTTP 503)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            "store", f"too many live-transcript subscribers (limit {limit}); try again later"
        )
        self.limit = limit


@dataclass(frozen=True)
class _End:
    """The conversation ended (or the feed stopped, or the subscriber fell behind)."""

    reason: str


_Item = StoredTurn | _End

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
Borrow = Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class Subscription:
    """One client's turns of one conversation: ``async for turn in subscription``; ``close()``
    (or leaving ``async with``) frees its slot. Ends when the conversation ends."""

    def __init__(self, feed: TurnFeed, conversation_id: UUID) -> None:
        self.conversation_id = conversation_id
        self._feed = feed
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending = 0
        self._seen: set[UUID] = set()
        self._done = False
        self._closed = False

    def offer(self, item: _Item, *, backlog: bool = False) -> None:
        """Called by the feed (on the event loop): queue an item, or end a subscriber that
        fell too far behind (``backlog``: a stored turn read at subscription, bounded by the
        read's own limit)."""
        if self._done:
            return
        if isinstance(item, _End):
            self._done = True
        elif not backlog and self._queue.qsize() >= SUBSCRIBER_QUEUE:
            logger.warning(
                "a live-transcript subscriber of %s fell %d turns behind; ending it",
                self.conversation_id,
                SUBSCRIBER_QUEUE,
            )
            self._done = True
            item = _End("too slow")
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[Turn]:
        return self._turns()

    async def _turns(self) -> AsyncIterator[Turn]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _End):
                    return
                turn_id = item.turn.turn_id
                if turn_id in self._seen:
                    continue
                self._seen.add(turn_id)
                yield item.turn
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._feed._remove(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class TurnFeed:
    """One LISTEN connection (``connect``) fanned out to many subscribers; ``borrow`` lends a
    connection of the caller's pool for each new subscriber's first read.

    ``start()`` on the event loop, ``await stop()`` at the end.
    """

    def __init__(
        self,
        connect: Connect,
        borrow: Borrow,
        *,
        max_subscribers: int = MAX_SUBSCRIBERS,
        retry_min_s: float = 0.5,
        retry_max_s: float = 5.0,
    ) -> None:
        self._connect = connect
        self._borrow = borrow
        self.max_subscribers = max_subscribers
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._subscribers: dict[UUID, set[Subscription]] = {}
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._since: datetime | None = None  # created_at up to which turns were delivered
        self.connected = asyncio.Event()
        """Set while the listening connection is up (tests and readiness may wait on it)."""

    @property
    def subscribers(self) -> int:
        return self._count

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="voicebot-turn-feed")

    async def stop(self) -> None:
        """Stop listening and end every subscription."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.offer(_End("feed stopped"))

    async def subscribe(self, conversation_id: UUID, backlog: int = 0) -> Subscription:
        """Watch one conversation: first up to ``backlog`` stored turns (all of them when it
        has ended, after which the subscription ends), then each new turn.

        Raises FeedFull at the cap, StageError("store") when the database cannot answer.
        """
        if self._count >= self.max_subscribers:
            raise FeedFull(self.max_subscribers)
        subscription = Subscription(self, conversation_id)
        # Registered before reading, so nothing recorded meanwhile can slip between the two.
        self._subscribers.setdefault(conversation_id, set()).add(subscription)
        self._count += 1
        try:
            async with self._borrow() as conn:
                ended = await conversation_ended_async(conn, conversation_id)
                if ended:
                    first = await fetch_conversation_turns(conn, conversation_id)
                elif backlog > 0:
                    first = await fetch_latest(conn, conversation_id, backlog)
                else:
                    first = []
        except (psycopg.Error, OSError) as e:
            subscription.close()
            raise StageError("store", f"cannot read conversation {conversation_id}: {e}") from e
        except BaseException:
            subscription.close()
            raise
        for stored in first:
            subscription.offer(stored, backlog=True)
        if ended:
            subscription.offer(_End("ended"))
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.conversation_id)
        if subscribers is not None and subscription in subscribers:
            subscribers.discard(subscription)
            self._count -= 1
            if not subscribers:
                del self._subscribers[subscription.conversation_id]

    def _deliver(self, stored: StoredTurn) -> None:
        if self._since is None or stored.created_at > self._since:
            self._since = stored.created_at
        for subscription in list(self._subscribers.get(stored.turn.conversation_id, ())):
            subscription.offer(stored)

    def _end(self, conversation_id: UUID) -> None:
        for subscription in list(self._subscribers.get(conversation_id, ())):
            subscription.offer(_End("ended"))

    # -- the one listening connection

    async def _listen(self) -> None:
        backoff = self._retry_min_s
        down_logged = False
        first = True
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    if first:
                        row = await (await conn.execute("SELECT now()")).fetchone()
                        self._since = self._since or (row[0] if row else None)
                    else:
                        await self._catch_up(conn)
                    first = False
                    if down_logged:
                        logger.warning("live transcripts: reconnected to the turn log")
                        down_logged = False
                    backoff = self._retry_min_s
                    self.connected.set()
                    await self._pump(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as e:
                self.connected.clear()
                if not down_logged:
                    down_logged = True
                    logger.warning(
                        "live transcripts: lost the turn log's connection (%s); retrying",
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max_s)
            except asyncio.CancelledError:
                self.connected.clear()
                raise

    async def _pump(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            wanted: list[UUID] = []
            ended: list[UUID] = []
            # Never leave these generators with break: they hold the connection's lock until
            # closed. Wait for one, then take what else arrived meanwhile without waiting.
            async for notify in conn.notifies(timeout=1.0, stop_after=1):
                self._route(notify.payload, wanted, ended)
            async for notify in conn.notifies(timeout=0.0):
                self._route(notify.payload, wanted, ended)
            for stored in await fetch_ids(conn, wanted):
                self._deliver(stored)
            for conversation_id in ended:
                # Its last turns may have been committed after we fetched: sweep, then end.
                for stored in await fetch_conversation_turns(conn, conversation_id):
                    self._deliver(stored)
                self._end(conversation_id)

    def _route(self, payload: str, wanted: list[UUID], ended: list[UUID]) -> None:
        parsed = parse_notification(payload)
        if parsed is None:
            return
        conversation_id, turn_id = parsed
        if conversation_id not in self._subscribers:
            return  # nobody here watches it: not even fetched
        if turn_id is None:
            ended.append(conversation_id)
        else:
            wanted.append(turn_id)

    async def _catch_up(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """After a reconnect: what was recorded (or ended) while we were not listening."""
        since = self._since
        for conversation_id in list(self._subscribers):
            if since is not None:
                for stored in await fetch_since(conn, conversation_id, since):
                    self._deliver(stored)
            if await conversation_ended_async(conn, conversation_id):
                self._end(conversation_id)


def parse_notification(payload: str) -> tuple[UUID, UUID | None] | None:
    """(conversation id, turn id) of a notification; the turn id is None for the end of a
    conversation; None (logged) for a payload that is not ours."""
    try:
        data = json.loads(payload)
        conversation_id = UUID(data["conversation_id"])
        if data.get("ended"):
            return conversation_id, None
        return conversation_id, UUID(data["turn_id"])
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("ignoring malformed notification %r", payload[:200])
        return None


# --- one subscriber in its own process (the CLI) -----------------------------------------------


async def follow_turns(
    dsn: str, conversation_id: UUID | None = None, *, backlog: int = 0
) -> AsyncIterator[Turn]:
    """Yield turns as they are recorded, by any process, optionally of one conversation.

    ``backlog``: first yield up to that many already-stored turns. Reconnects (catching up on
    what it missed) when the connection drops; the first connection's failure propagates.
    """
    async for stored in follow_stored_turns(dsn, conversation_id, backlog=backlog):
        yield stored.turn


async def follow_stored_turns(
    dsn: str,
    conversation_id: UUID | None = None,
    *,
    backlog: int = 0,
    retry_s: float = 1.0,
) -> AsyncIterator[StoredTurn]:
    """Like ``follow_turns``, with each row's ``created_at``."""
    seen: set[UUID] = set()
    seen_order: deque[UUID] = deque()
    last_created: datetime | None = None
    connected_once = False
    catch_up: list[StoredTurn] = []

    def fresh(stored: StoredTurn) -> bool:
        nonlocal last_created
        turn_id = stored.turn.turn_id
        if turn_id in seen:
            return False
        seen.add(turn_id)
        seen_order.append(turn_id)
        if len(seen_order) > 10_000:
            seen.discard(seen_order.popleft())
        if last_created is None or stored.created_at > last_created:
            last_created = stored.created_at
        return True

    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=5
            ) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                if not connected_once:
                    catch_up = await fetch_latest(conn, conversation_id, backlog) if backlog else []
                elif last_created is not None:
                    catch_up = await fetch_since(conn, conversation_id, last_created)
                connected_once = True
                for stored in catch_up:
                    if fresh(stored):
                        yield stored
                while True:
                    wanted: list[UUID] = []
                    async for notify in conn.notifies(stop_after=1):
                        parsed = parse_notification(notify.payload)
                        if parsed is None or parsed[1] is None:
                            continue
                        if conversation_id is None or parsed[0] == conversation_id:
                            wanted.append(parsed[1])
                    for stored in await fetch_ids(conn, wanted):
                        if fresh(stored):
                            yield stored
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            if not connected_once:
                raise
            logger.warning("lost the live-transcript connection (%s); reconnecting", e)
            await asyncio.sleep(retry_s)
