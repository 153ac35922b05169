"""The restaurant's booking rules, one by one (pure: no database, no clock)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from voicebot.personas import load_persona
from voicebot.reservations.rules import (
    RestaurantRules,
    describe_day,
    parse_day,
    parse_hhmm,
    refusal,
)

TOKYO = ZoneInfo("Asia/Tokyo")
RULES = RestaurantRules(name="sakura")
NOW = datetime(2026, 11, 20, 9, 0, tzinfo=TOKYO)  # a Friday morning in Tokyo
PERSONAS = Path(__file__).resolve().parent.parent / "personas"


def why(day: str, at: str, party: int = 2, now: datetime = NOW, rules=RULES) -> str | None:
    return refusal(rules, parse_day(day), parse_hhmm(at), party, now)


def test_weekday_hours_are_11_to_22():
    assert why("2026-12-04", "11:00") is None  # Friday
    assert why("2026-12-04", "21:30") is None  # the last slot before 22:00
    early = why("2026-12-04", "10:30")
    assert early is not None and "open 11:00 to 22:00" in early and "weekday" in early
    assert why("2026-12-04", "22:00") is not None


def test_weekend_hours_are_10_to_23():
    assert why("2026-12-05", "10:00") is None  # Saturday
    assert why("2026-12-06", "22:30") is None  # Sunday, last slot
    late = why("2026-12-05", "23:00")
    assert late is not None and "open 10:00 to 23:00" in late and "weekend" in late


def test_japanese_public_holidays_get_weekend_hours():
    # 2026-11-23 (Monday) is Labour Thanksgiving Day; 2026-11-24 is an ordinary Tuesday.
    assert RULES.is_holiday(date(2026, 11, 23))
    assert why("2026-11-23", "10:00") is None
    assert "public holiday" in (why("2026-11-23", "09:30") or "")
    assert why("2026-11-24", "10:00") is not None
    no_holidays = RestaurantRules(name="x", public_holidays="none")
    assert why("2026-11-23", "10:00", rules=no_holidays) is not None


@pytest.mark.parametrize("day", ["2026-12-31", "2027-01-01", "2027-01-02", "2027-01-03"])
def test_closed_over_the_new_year(day):
    assert why(day, "12:00") == (
        f"closed on {day} (closed every year on 12-31, 01-01, 01-02, 01-03)"
    )
    assert RULES.slots(parse_day(day)) == []


def test_open_again_on_january_4_and_december_30():
    assert why("2027-01-04", "12:00") is None
    assert why("2026-12-30", "12:00") is None


@pytest.mark.parametrize("party", [0, 5, 6, -1])
def test_parties_of_1_to_4_only(party):
    assert why("2026-12-04", "19:00", party) == f"parties of 1 to 4 only (asked for {party})"


@pytest.mark.parametrize("party", [1, 4])
def test_party_bounds_are_inclusive(party):
    assert why("2026-12-04", "19:00", party) is None


def test_bookings_start_on_the_slot_grid():
    assert why("2026-12-04", "19:30") is None
    off = why("2026-12-04", "19:15")
    assert off is not None and "every 30 minutes" in off and "19:00" in off


def test_past_days_and_times_are_refused():
    assert "in the past" in (why("2026-11-19", "19:00") or "")
    assert "already passed" in (why("2026-11-20", "08:30") or "")
    assert why("2026-11-20", "12:00") is None


def test_at_most_max_days_ahead():
    assert why("2027-02-18", "12:00") is None  # 90 days after 2026-11-20
    assert "at most 90 days ahead" in (why("2027-02-19", "12:00") or "")


def test_today_is_the_persona_time_zones_today():
    # 16:00 UTC on Nov 20 is already 01:00 on Saturday Nov 21 in Tokyo.
    utc_evening = datetime(2026, 11, 20, 16, 0, tzinfo=UTC).astimezone(TOKYO)
    assert "in the past" in (why("2026-11-20", "19:00", now=utc_evening) or "")
    assert why("2026-11-21", "10:00", now=utc_evening) is None
    persona = load_persona(PERSONAS / "reservation-en.toml")
    prompt = persona.system_prompt_at(datetime(2026, 11, 20, 16, 0, tzinfo=UTC))
    assert prompt.rstrip().endswith(
        "Today is Saturday, 2026-11-21; the time is 01:00 (Asia/Tokyo)."
    )
    ja = load_persona(PERSONAS / "reservation-ja.toml")
    assert "今日は2026年11月21日（土曜日）" in ja.system_prompt_at(
        datetime(2026, 11, 20, 16, 0, tzinfo=UTC)
    )


def test_slots_of_a_day():
    weekday = RULES.slots(date(2026, 12, 4))
    assert weekday[0] == time(11, 0) and weekday[-1] == time(21, 30) and len(weekday) == 22
    assert RULES.slots(date(2026, 12, 5))[0] == time(10, 0)


def test_parsing_dates_and_times():
    assert parse_day("2026-12-05") == date(2026, 12, 5)
    assert describe_day(date(2026, 12, 5)) == "2026-12-05 (Saturday)"
    for bad in ("2026-2-5", "05/12/2026", "2026-02-30", "tomorrow"):
        with pytest.raises(ValueError):
            parse_day(bad)
    assert parse_hhmm("07:05") == time(7, 5)
    for bad in ("7pm", "24:00", "19:60", "7:00"):
        with pytest.raises(ValueError):
            parse_hhmm(bad)


def test_rules_validate_their_data():
    with pytest.raises(ValidationError, match="closing time"):
        RestaurantRules(name="x", weekday_hours=("22:00", "11:00"))
    with pytest.raises(ValidationError, match="MM-DD"):
        RestaurantRules(name="x", closed_days=("31-12",))
    with pytest.raises(ValidationError, match="max_party"):
        RestaurantRules(name="x", max_party=20, seats_per_slot=12)
