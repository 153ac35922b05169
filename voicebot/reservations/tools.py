"""The reservation desk's tools: ``check_availability``, ``create_reservation``,
``find_reservation`` and ``cancel_reservation``.

Each checks the persona's ``[restaurant]`` rules against today's date in the persona's time
zone before touching the bookings, and answers in one line the model can relay: "available:
...", "not available: ...", "booked: ...", "not booked: parties of 1 to 4 only", ...
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from voicebot.reservations.book import Reservation, ReservationBook
from voicebot.reservations.rules import (
    RestaurantRules,
    describe_day,
    parse_day,
    parse_hhmm,
    refusal,
)
from voicebot.tools.registry import Tool, ToolContext

_NEEDS = ("restaurant", "timezone")
_A = TypeVar("_A")


def _valid_day(value: str) -> str:
    parse_day(value)
    return value


def _valid_time(value: str) -> str:
    parse_hhmm(value)
    return value


DateArg = Annotated[
    str,
    AfterValidator(_valid_day),
    Field(
        description="The day as YYYY-MM-DD. Work out dates like 'next Saturday' from today's "
        "date in the system prompt."
    ),
]
TimeArg = Annotated[
    str, AfterValidator(_valid_time), Field(description="The time as HH:MM, 24-hour (7 pm: 19:00).")
]
PartySize = Annotated[int, Field(description="How many people, e.g. 2.")]
Name = Annotated[
    str, Field(min_length=1, max_length=100, description="The name the booking is under.")
]


class _Slot:
    """The parsed ``date`` and ``time`` of an argument model."""

    if TYPE_CHECKING:  # declared by each model, in the order the model should see them
        date: str
        time: str

    @property
    def day(self) -> dt.date:
        return parse_day(self.date)

    @property
    def at(self) -> dt.time:
        return parse_hhmm(self.time)


class AvailabilityArgs(_Slot, BaseModel):
    """check_availability(date, time, party_size)"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    date: DateArg
    time: TimeArg
    party_size: PartySize


class CreateArgs(_Slot, BaseModel):
    """create_reservation(name, date, time, party_size, requests="")"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    date: DateArg
    time: TimeArg
    party_size: PartySize
    requests: str = Field(
        default="",
        max_length=500,
        description="Allergies, celebrations, seating wishes; empty when none.",
    )


class CancelArgs(_Slot, BaseModel):
    """cancel_reservation(name, date, time)"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    date: DateArg
    time: TimeArg


class FindArgs(BaseModel):
    """find_reservation(name)"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name


UNAVAILABLE = (
    "unavailable: bookings cannot be taken or looked up by phone right now (this desk has no "
    "booking system); tell the caller and do not say a table is booked"
)
"""What every reservation tool answers when the process runs without a database."""


class _NoBook(Exception):
    """The process runs without a database: there is no reservation book."""


def _desk(ctx: ToolContext) -> tuple[RestaurantRules, ReservationBook]:
    rules = ctx.persona.restaurant
    if rules is None:
        raise RuntimeError(f"persona {ctx.persona.name} has no [restaurant] rules")
    if ctx.reservations is None:
        raise _NoBook
    return rules, ctx.reservations


def _needs_book(run: Callable[[ToolContext, _A], str]) -> Callable[[ToolContext, _A], str]:
    """Without a database, a tool answers ``UNAVAILABLE`` (a result the model relays, not a
    failure: nothing will come back later in the call)."""

    @functools.wraps(run)
    def guarded(ctx: ToolContext, args: _A) -> str:
        try:
            return run(ctx, args)
        except _NoBook:
            return UNAVAILABLE

    return guarded


def _people(n: int) -> str:
    return "1 person" if n == 1 else f"{n} people"


def _summary(r: Reservation) -> str:
    requests = f", requests: {r.requests}" if r.requests else ""
    return (
        f"{r.name}, {_people(r.party_size)} at {r.time:%H:%M} on {describe_day(r.date)}{requests}"
    )


def _alternatives(
    rules: RestaurantRules, book: ReservationBook, ctx: ToolContext, args: AvailabilityArgs
) -> str:
    """Free times near the asked one, that day: "free that day: 19:30, 21:00"."""
    day, at = args.day, args.at
    now = ctx.now()
    taken = book.seats_taken(rules.name, day)

    def distance(t: dt.time) -> int:
        return abs((t.hour * 60 + t.minute) - (at.hour * 60 + at.minute))

    free = [
        t
        for t in rules.slots(day)
        if t != at
        and (day > now.date() or t > now.time())
        and rules.seats_per_slot - taken.get(t, 0) >= args.party_size
    ]
    nearest = sorted(sorted(free, key=distance)[:3])
    if not nearest:
        return f"no other time on {day.isoformat()} has room for {_people(args.party_size)}"
    return f"free that day for {_people(args.party_size)}: " + ", ".join(
        f"{t:%H:%M}" for t in nearest
    )


@_needs_book
def check_availability(ctx: ToolContext, args: AvailabilityArgs) -> str:
    rules, book = _desk(ctx)
    why = refusal(rules, args.day, args.at, args.party_size, ctx.now())
    if why is not None:
        return f"not available: {why}"
    left = rules.seats_per_slot - book.seats_taken(rules.name, args.day).get(args.at, 0)
    if args.party_size <= left:
        return (
            f"available: a table for {_people(args.party_size)} at {args.time} on "
            f"{describe_day(args.day)}"
        )
    return (
        f"not available: fully booked at {args.time} on {describe_day(args.day)} "
        f"({max(left, 0)} seats left); {_alternatives(rules, book, ctx, args)}"
    )


@_needs_book
def create_reservation(ctx: ToolContext, args: CreateArgs) -> str:
    rules, book = _desk(ctx)
    why = refusal(rules, args.day, args.at, args.party_size, ctx.now())
    if why is not None:
        return f"not booked: {why}"
    booking = book.book(
        restaurant=rules.name,
        seats_per_slot=rules.seats_per_slot,
        name=args.name.strip(),
        day=args.day,
        at=args.at,
        party_size=args.party_size,
        requests=args.requests.strip(),
        conversation_id=ctx.conversation_id,
        cancelled=ctx.cancelled,
    )
    if booking.cancelled:
        return "not booked: the call moved on before the booking was saved"
    if booking.reservation is None:
        wanted = AvailabilityArgs(date=args.date, time=args.time, party_size=args.party_size)
        return (
            f"not booked: fully booked at {args.time} on {describe_day(args.day)} "
            f"({booking.seats_left} seats left); {_alternatives(rules, book, ctx, wanted)}"
        )
    if not booking.created:
        return (
            "already booked in this call, nothing changed: "
            f"{_summary(booking.reservation)} (booking number {booking.reservation.reservation_id})"
        )
    return (
        f"booked: {_summary(booking.reservation)} "
        f"(booking number {booking.reservation.reservation_id})"
    )


@_needs_book
def find_reservation(ctx: ToolContext, args: FindArgs) -> str:
    rules, book = _desk(ctx)
    found = book.find(restaurant=rules.name, name=args.name.strip())
    upcoming = [r for r in found if r.date >= ctx.now().date()]
    if not upcoming:
        return f"no upcoming booking under the name {args.name.strip()}"
    return "found: " + "; ".join(_summary(r) for r in upcoming[:5])


@_needs_book
def cancel_reservation(ctx: ToolContext, args: CancelArgs) -> str:
    rules, book = _desk(ctx)
    if ctx.cancelled.is_set():
        return "not cancelled: the call moved on"
    cancelled = book.cancel(restaurant=rules.name, name=args.name.strip(), day=args.day, at=args.at)
    if not cancelled:
        return (
            f"not cancelled: no booking under {args.name.strip()} at {args.time} on "
            f"{describe_day(args.day)}"
        )
    return "cancelled: " + "; ".join(_summary(r) for r in cancelled)


RESERVATION_TOOLS: tuple[Tool, ...] = (
    Tool(
        name="check_availability",
        description="Check whether the restaurant can seat a party at a date and time. "
        "Answers 'available', or 'not available' with the reason and free times nearby.",
        arguments=AvailabilityArgs,
        run=check_availability,
        timeout_s=4.0,
        persona_fields=_NEEDS,
    ),
    Tool(
        name="create_reservation",
        description="Book a table. Call it only after reading the booking back to the guest "
        "and hearing them confirm it. Answers 'booked' or 'not booked' with the reason.",
        arguments=CreateArgs,
        run=create_reservation,
        timeout_s=6.0,
        persona_fields=_NEEDS,
    ),
    Tool(
        name="find_reservation",
        description="Look up the guest's upcoming bookings by the name they are under.",
        arguments=FindArgs,
        run=find_reservation,
        timeout_s=4.0,
        persona_fields=_NEEDS,
    ),
    Tool(
        name="cancel_reservation",
        description="Cancel a booking, after the guest confirmed which one.",
        arguments=CancelArgs,
        run=cancel_reservation,
        timeout_s=4.0,
        persona_fields=_NEEDS,
    ),
)
