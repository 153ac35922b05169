"""A restaurant's booking rules, as persona data, and the checks every booking passes.

Everything here is pure: ``refusal(rules, day, at, party_size, now)`` says why a booking is
refused (a sentence the model can repeat to the caller) or returns None. Dates and times are
the restaurant's local ones; ``now`` must already be in the restaurant's time zone.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_MMDD = re.compile(r"^(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def parse_hhmm(value: str) -> time:
    """``"HH:MM"`` (24-hour) as a time; ValueError otherwise."""
    match = _HHMM.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a time as HH:MM (24-hour, e.g. 19:30)")
    return time(int(match[1]), int(match[2]))


def parse_day(value: str) -> date:
    """``"YYYY-MM-DD"`` as a date; ValueError otherwise."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(f"{value!r} is not a date as YYYY-MM-DD (e.g. 2026-12-05)")
    try:
        return date.fromisoformat(value)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a valid date ({e})") from e


def _minutes(t: time) -> int:
    return t.hour * 60 + t.minute


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


class RestaurantRules(BaseModel):
    """The ``[restaurant]`` table of a persona file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100)
    """Which restaurant the bookings are for (personas of one restaurant share its seats)."""
    weekday_hours: tuple[str, str] = ("11:00", "22:00")
    """Opening and closing time, Monday to Friday."""
    weekend_hours: tuple[str, str] = ("10:00", "23:00")
    """Opening and closing time on Saturdays, Sundays and public holidays."""
    public_holidays: Literal["JP", "none"] = "JP"
    """Whose public holidays get weekend hours (JP: Japan's, from the ``jpholiday`` package)."""
    closed_days: tuple[str, ...] = ("12-31", "01-01", "01-02", "01-03")
    """Days closed every year, as MM-DD."""
    min_party: int = Field(default=1, ge=1)
    max_party: int = Field(default=4, ge=1)
    seats_per_slot: int = Field(default=12, ge=1)
    """Guests that can start a meal in one time slot (the sum of the parties booked there)."""
    slot_minutes: int = Field(default=30, ge=5, le=240)
    """Bookings start on this grid (30: on the hour and half hour); the last slot starts this
    long before closing."""
    max_days_ahead: int = Field(default=90, ge=0)

    @field_validator("weekday_hours", "weekend_hours")
    @classmethod
    def _hours(cls, value: tuple[str, str]) -> tuple[str, str]:
        opens, closes = (parse_hhmm(v) for v in value)
        if closes <= opens:
            raise ValueError(f"closing time {value[1]} must be after opening time {value[0]}")
        return value

    @field_validator("closed_days")
    @classmethod
    def _closed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for day in value:
            if not _MMDD.match(day):
                raise ValueError(f"{day!r} is not a day as MM-DD (e.g. 12-31)")
        return value

    @model_validator(mode="after")
    def _party(self) -> RestaurantRules:
        if self.max_party < self.min_party:
            raise ValueError("max_party must be >= min_party")
        if self.max_party > self.seats_per_slot:
            raise ValueError("max_party must be <= seats_per_slot")
        return self

    def is_holiday(self, day: date) -> bool:
        """Whether ``day`` is a public holiday under ``public_holidays``."""
        return self.public_holidays == "JP" and _jp_holiday(day)

    def hours(self, day: date) -> tuple[time, time]:
        """Opening and closing time on ``day`` (whether or not it is a closed day)."""
        weekend = day.weekday() >= 5 or self.is_holiday(day)
        opens, closes = self.weekend_hours if weekend else self.weekday_hours
        return parse_hhmm(opens), parse_hhmm(closes)

    def is_closed(self, day: date) -> bool:
        return day.strftime("%m-%d") in self.closed_days

    def slots(self, day: date) -> list[time]:
        """Every time a booking may start on ``day`` (empty when closed)."""
        if self.is_closed(day):
            return []
        opens, closes = (_minutes(t) for t in self.hours(day))
        first = -(-opens // self.slot_minutes) * self.slot_minutes
        return [
            time(m // 60, m % 60)
            for m in range(first, closes - self.slot_minutes + 1, self.slot_minutes)
        ]


@cache
def _jp_holiday(day: date) -> bool:
    import jpholiday  # imported when first needed: it builds its calendar on import

    return bool(jpholiday.is_holiday(day))


def describe_day(day: date) -> str:
    """``2026-12-05 (Saturday)``: the model should not have to work out the weekday."""
    return f"{day.isoformat()} ({WEEKDAYS[day.weekday()]})"


def refusal(
    rules: RestaurantRules, day: date, at: time, party_size: int, now: datetime
) -> str | None:
    """Why this booking cannot be taken, in one sentence for the model; None when it can be.

    Capacity is not checked here (it needs the bookings; see ``ReservationBook``).
    """
    if not rules.min_party <= party_size <= rules.max_party:
        return f"parties of {rules.min_party} to {rules.max_party} only (asked for {party_size})"
    today = now.date()
    if day < today:
        return f"{day.isoformat()} is in the past (today is {describe_day(today)})"
    if day == today and at <= now.time():
        return (
            f"{at:%H:%M} today has already passed (it is now {now:%H:%M} on {describe_day(today)})"
        )
    last_day = today + timedelta(days=rules.max_days_ahead)
    if day > last_day:
        return (
            f"bookings are taken at most {rules.max_days_ahead} days ahead "
            f"(until {last_day.isoformat()})"
        )
    if rules.is_closed(day):
        return f"closed on {day.isoformat()} (closed every year on " + (
            ", ".join(rules.closed_days) + ")"
        )
    opens, closes = rules.hours(day)
    kind = (
        "a public holiday"
        if rules.is_holiday(day)
        else "a weekend day"
        if day.weekday() >= 5
        else "a weekday"
    )
    last = _minutes(closes) - rules.slot_minutes
    if not _minutes(opens) <= _minutes(at) <= last:
        return (
            f"{describe_day(day)} is {kind}, open {opens:%H:%M} to {closes:%H:%M}; "
            f"bookings from {opens:%H:%M} to {_hhmm(last)} only (asked for {at:%H:%M})"
        )
    if _minutes(at) % rules.slot_minutes:
        return (
            f"bookings start every {rules.slot_minutes} minutes "
            f"(e.g. {_hhmm(_minutes(at) - _minutes(at) % rules.slot_minutes)}); "
            f"asked for {at:%H:%M}"
        )
    return None
