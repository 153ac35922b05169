"""The ``reservations`` table: take a booking without overbooking, list and cancel bookings.

``ReservationBook.book`` runs one transaction: it takes a transaction-level advisory lock on the
slot (restaurant, date, time), so concurrent bookings of one slot queue up, re-reads the seats
taken, and inserts. Either the whole booking commits or nothing does; a booking whose
``cancelled`` event is set before the commit is rolled back. It is idempotent per conversation
and slot: booking the same slot again in the same call returns the existing booking.
Every value is a query parameter; nothing the model says becomes SQL.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from voicebot.errors import StageError

logger = logging.getLogger(__name__)

STAGE = "reservations"

_COLUMNS = (
    "id, restaurant, name, date, time, party_size, requests, conversation_id, created_at,"
    " cancelled_at"
)

# Two bookings of one slot serialize on this lock (held until their transaction ends).
_LOCK_SLOT = (
    "SELECT pg_advisory_xact_lock(hashtextextended("
    "'voicebot.reservations|' || %(restaurant)s || '|' || %(date)s::text || '|' || %(time)s::text,"
    " 0))"
)


@dataclass(frozen=True)
class Reservation:
    """One row of the ``reservations`` table."""

    reservation_id: int
    restaurant: str
    name: str
    date: date
    time: time
    party_size: int
    requests: str
    conversation_id: UUID
    created_at: datetime
    cancelled_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON form the CLI and the API print."""
        return {
            "id": self.reservation_id,
            "restaurant": self.restaurant,
            "name": self.name,
            "date": self.date.isoformat(),
            "time": self.time.strftime("%H:%M"),
            "party_size": self.party_size,
            "requests": self.requests,
            "conversation_id": str(self.conversation_id),
            "created_at": self.created_at.isoformat(),
            "cancelled_at": None if self.cancelled_at is None else self.cancelled_at.isoformat(),
        }


@dataclass(frozen=True)
class Booking:
    """What ``book`` did.

    reservation: the booking (new or already made in this call); None when not booked.
    created: True when this call inserted it now.
    seats_left: seats still free in the slot before this booking.
    cancelled: the booking was cancelled before it committed (nothing stored).
    """

    reservation: Reservation | None
    created: bool
    seats_left: int
    cancelled: bool = False


class BookingCancelled(Exception):
    """Raised inside the transaction to roll it back."""


def _reservation(row: dict[str, Any]) -> Reservation:
    return Reservation(
        reservation_id=row["id"],
        restaurant=row["restaurant"],
        name=row["name"],
        date=row["date"],
        time=row["time"],
        party_size=row["party_size"],
        requests=row["requests"],
        conversation_id=row["conversation_id"],
        created_at=row["created_at"],
        cancelled_at=row["cancelled_at"],
    )


def lock_slot(conn: psycopg.Connection[Any], restaurant: str, day: date, at: time) -> None:
    """Take the slot's booking lock for the current transaction (what ``book`` waits on)."""
    conn.execute(_LOCK_SLOT, {"restaurant": restaurant, "date": day, "time": at})


class ReservationBook:
    """Bookings in PostgreSQL through a psycopg pool (blocking: call it off the event loop).

    ``lock_timeout_s`` bounds the wait for a slot another booking holds.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        *,
        connect_timeout_s: float = 3.0,
        lock_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.connect_timeout_s = connect_timeout_s
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def connect(cls, dsn: str, *, max_size: int = 4, **kwargs: Any) -> ReservationBook:
        """A book with a pool of its own (opened without waiting; ``close()`` closes it)."""
        pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            open=False,
            kwargs={"connect_timeout": 3},
            name="voicebot-reservations",
        )
        pool.open(wait=False)
        book = cls(pool, **kwargs)
        book._owns_pool = True
        return book

    _owns_pool = False

    def close(self) -> None:
        """Close the pool if ``connect`` made it (a pool passed in stays open)."""
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> ReservationBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def seats_taken(self, restaurant: str, day: date) -> dict[time, int]:
        """Guests booked per slot on ``day`` (slots with no booking are absent)."""
        try:
            with self.pool.connection(timeout=self.connect_timeout_s) as conn:
                rows = conn.execute(
                    "SELECT time, sum(party_size) FROM reservations"
                    " WHERE restaurant = %s AND date = %s AND cancelled_at IS NULL GROUP BY time",
                    (restaurant, day),
                ).fetchall()
        except psycopg.Error as e:
            raise StageError(STAGE, f"cannot read the bookings: {e}") from e
        return {row[0]: int(row[1]) for row in rows}

    def book(
        self,
        *,
        restaurant: str,
        seats_per_slot: int,
        name: str,
        day: date,
        at: time,
        party_size: int,
        requests: str,
        conversation_id: UUID,
        cancelled: threading.Event | None = None,
    ) -> Booking:
        """Book the slot if it has ``party_size`` seats left, in one transaction."""
        params = {
            "restaurant": restaurant,
            "name": name,
            "date": day,
            "time": at,
            "party_size": party_size,
            "requests": requests,
            "conversation_id": conversation_id,
        }
        try:
            with self.pool.connection(timeout=self.connect_timeout_s) as conn:
                try:
                    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                        cur.execute(
                            "SELECT set_config('lock_timeout', %s, true)",
                            (f"{int(self.lock_timeout_s * 1000)}ms",),
                        )
                        cur.execute(_LOCK_SLOT, params)
                        cur.execute(
                            f"SELECT {_COLUMNS} FROM reservations WHERE conversation_id = "
                            "%(conversation_id)s AND restaurant = %(restaurant)s AND date = "
                            "%(date)s AND time = %(time)s AND cancelled_at IS NULL",
                            params,
                        )
                        existing = cur.fetchone()
                        cur.execute(
                            "SELECT coalesce(sum(party_size), 0) AS taken FROM reservations"
                            " WHERE restaurant = %(restaurant)s AND date = %(date)s"
                            " AND time = %(time)s AND cancelled_at IS NULL",
                            params,
                        )
                        taken_row = cur.fetchone()
                        taken = int(taken_row["taken"]) if taken_row else 0
                        if existing is not None:
                            return Booking(_reservation(existing), False, seats_per_slot - taken)
                        seats_left = seats_per_slot - taken
                        if party_size > seats_left:
                            return Booking(None, False, max(seats_left, 0))
                        cur.execute(
                            "INSERT INTO reservations (restaurant, name, date, time, party_size,"
                            " requests, conversation_id) VALUES (%(restaurant)s, %(name)s,"
                            " %(date)s, %(time)s, %(party_size)s, %(requests)s,"
                            f" %(conversation_id)s) RETURNING {_COLUMNS}",
                            params,
                        )
                        row = cur.fetchone()
                        assert row is not None
                        if cancelled is not None and cancelled.is_set():
                            raise BookingCancelled
                        booked = _reservation(row)
                except BookingCancelled:
                    logger.info("booking for %s cancelled before commit: nothing stored", day)
                    return Booking(None, False, 0, cancelled=True)
        except psycopg.Error as e:
            raise StageError(STAGE, f"cannot store the booking: {e}") from e
        logger.info(
            "booked %s: %d at %s %s (conversation %s)",
            restaurant,
            party_size,
            day,
            at.strftime("%H:%M"),
            conversation_id,
        )
        return Booking(booked, True, seats_left)

    def cancel(self, *, restaurant: str, name: str, day: date, at: time) -> list[Reservation]:
        """Cancel the live bookings under ``name`` (case-insensitive) for that slot."""
        try:
            with self.pool.connection(timeout=self.connect_timeout_s) as conn:
                with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(
                        "UPDATE reservations SET cancelled_at = now() WHERE restaurant = %s"
                        " AND lower(name) = lower(%s) AND date = %s AND time = %s"
                        f" AND cancelled_at IS NULL RETURNING {_COLUMNS}",
                        (restaurant, name, day, at),
                    )
                    return [_reservation(r) for r in cur.fetchall()]
        except psycopg.Error as e:
            raise StageError(STAGE, f"cannot cancel the booking: {e}") from e

    def find(self, *, restaurant: str, name: str, day: date | None = None) -> list[Reservation]:
        """Live bookings under ``name`` (case-insensitive), from today's date on when no day."""
        return self._select(restaurant=restaurant, name=name, day=day)

    def bookings(
        self, *, day: date | None = None, restaurant: str | None = None, limit: int = 1000
    ) -> list[Reservation]:
        """Live bookings by date and time (of one day, or all), at most ``limit``."""
        return self._select(restaurant=restaurant, day=day, limit=limit)

    def _select(
        self,
        *,
        restaurant: str | None = None,
        name: str | None = None,
        day: date | None = None,
        limit: int = 1000,
    ) -> list[Reservation]:
        try:
            with self.pool.connection(timeout=self.connect_timeout_s) as conn:
                return list_reservations(
                    conn, day=day, restaurant=restaurant, name=name, limit=limit
                )
        except psycopg.Error as e:
            raise StageError(STAGE, f"cannot read the bookings: {e}") from e


_SELECT = (
    f"SELECT {_COLUMNS} FROM reservations WHERE cancelled_at IS NULL"
    " AND (%(day)s::date IS NULL OR date = %(day)s)"
    " AND (%(restaurant)s::text IS NULL OR restaurant = %(restaurant)s)"
    " AND (%(name)s::text IS NULL OR lower(name) = lower(%(name)s))"
    " ORDER BY date, time, id LIMIT %(limit)s"
)


def list_reservations(
    conn: psycopg.Connection[Any],
    *,
    day: date | None = None,
    restaurant: str | None = None,
    name: str | None = None,
    limit: int = 1000,
) -> list[Reservation]:
    """Live bookings by date and time, filtered by day, restaurant and name (each optional)."""
    params = {"day": day, "restaurant": restaurant, "name": name, "limit": max(0, limit)}
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_SELECT, params)
        return [_reservation(r) for r in cur.fetchall()]


async def list_reservations_async(
    conn: psycopg.AsyncConnection[Any], *, day: date | None = None, limit: int = 1000
) -> list[Reservation]:
    """``list_reservations`` on an async connection (for the API)."""
    params = {"day": day, "restaurant": None, "name": None, "limit": max(0, limit)}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SELECT, params)
        return [_reservation(r) for r in await cur.fetchall()]
