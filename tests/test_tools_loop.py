"""The tool loop: the real ollama client against our Ollama-protocol server with scripted tool
calls, the real reservation tools and the real embedded PostgreSQL."""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from pydantic import BaseModel

from voicebot.conversation import Message
from voicebot.llm import OllamaChat, make_client
from voicebot.ollama_server import (
    ConversationScript,
    OllamaProtocolServer,
    Rule,
    ScriptedReply,
    ScriptedToolCall,
)
from voicebot.personas import load_persona
from voicebot.reservations.book import ReservationBook, lock_slot
from voicebot.reservations.rules import RestaurantRules, parse_day, parse_hhmm
from voicebot.tools.loop import ToolFiller, ToolFinished, ToolLoop, ToolStarted
from voicebot.tools.registry import Tool, Toolset, available_tools, bind_tools

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # Friday morning in Tokyo
PERSONAS = Path(__file__).resolve().parent.parent / "personas"
SLOT = {"date": "2026-12-05", "time": "19:00"}
BOOKING = {"name": "Tanaka", **SLOT, "party_size": 2, "requests": "window seat"}


def call(tool, **arguments):
    return ScriptedReply("", (ScriptedToolCall(tool, arguments),))


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tool") as pool:
        yield pool


@pytest.fixture
def book(pg_dsn):
    with ConnectionPool(pg_dsn, min_size=1, max_size=4, open=True) as pool:
        yield ReservationBook(pool, lock_timeout_s=10.0)


@pytest.fixture
def persona():
    """reservation-en with a restaurant of its own, so that tests do not share seats."""
    base = load_persona(PERSONAS / "reservation-en.toml")
    rules = RestaurantRules(name=f"test-{uuid.uuid4().hex[:10]}")
    return base.model_copy(update={"restaurant": rules})


def stored(pg_dsn, persona):
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT name, date::text, to_char(time, 'HH24:MI'), party_size, requests,"
            " conversation_id FROM reservations WHERE restaurant = %s",
            (persona.restaurant.name,),
        ).fetchall()


class Desk:
    """One scripted call: the server, the real client, the persona's tools and the loop."""

    def __init__(self, script, persona, book, executor, **loop_kwargs):
        self.server = OllamaProtocolServer("instant", script=script)
        self.server.start()
        self.client = make_client(self.server.base_url, timeout_s=5.0)
        self.chat = OllamaChat(self.client, persona.llm_model)
        self.conversation_id = uuid.uuid4()
        self.toolset = bind_tools(
            persona, self.conversation_id, reservations=book, clock=lambda: NOW
        )
        self.loop = ToolLoop(self.chat, self.toolset, executor=executor, **loop_kwargs)
        self.persona = persona
        self.history: list = []

    def say(self, text, cancel=None):
        messages = [
            Message("system", self.persona.system_prompt_at(NOW)),
            *self.history,
            Message("user", text),
        ]
        reply = self.loop.reply(messages, cancel)
        events = list(reply)
        spoken = "".join(e for e in events if isinstance(e, str))
        self.history += [Message("user", text), Message("assistant", spoken)]
        return events, spoken, reply.tool_calls

    def close(self):
        self.client.close()
        self.server.stop()


@pytest.fixture
def desk(persona, book, executor):
    made = []

    def make(rules, **kwargs):
        d = Desk(ConversationScript(rules, default="Sorry?"), persona, book, executor, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


BOOKING_SCRIPT = [
    Rule(call("check_availability", **SLOT, party_size=2), user="table for two"),
    Rule("We have a table then. Shall I book it?", after_tool="check_availability"),
    Rule(call("create_reservation", **BOOKING), user="yes"),
    Rule("Sorry, I could not book that.", after_tool="create_reservation", result_contains="not"),
    Rule("You're booked, see you then!", after_tool="create_reservation", result_contains="booked"),
]


def test_check_then_create_stores_one_row(desk, pg_dsn, persona):
    d = desk(BOOKING_SCRIPT)
    events, spoken, calls = d.say("A table for two on December 5 at seven pm, name Tanaka.")
    assert spoken == "We have a table then. Shall I book it?"
    assert [type(e) for e in events[:2]] == [ToolStarted, ToolFinished]
    assert events[0] == ToolStarted("check_availability", {**SLOT, "party_size": 2})
    assert calls[0].result == "available: a table for 2 people at 19:00 on 2026-12-05 (Saturday)"
    assert calls[0].error is None and calls[0].tool_ms is not None and calls[0].tool_ms > 0
    assert stored(pg_dsn, persona) == []  # nothing is booked before the read-back is confirmed

    events, spoken, calls = d.say("Yes, please.")
    assert spoken == "You're booked, see you then!"
    assert calls[0].name == "create_reservation" and calls[0].result.startswith("booked: Tanaka")
    assert stored(pg_dsn, persona) == [
        ("Tanaka", "2026-12-05", "19:00", 2, "window seat", d.conversation_id)
    ]

    # On the wire: the request that continued the reply held the assistant's tool call, then
    # the tool's result as a `tool` message, and offered the persona's tools.
    chats = d.server.chat_requests()
    assert len(chats) == 4
    follow_up = chats[-1].messages
    assert follow_up[-2]["role"] == "assistant"
    assert follow_up[-2]["tool_calls"][0]["function"] == {
        "name": "create_reservation",
        "arguments": BOOKING,
    }
    assert follow_up[-1]["role"] == "tool"
    assert follow_up[-1]["tool_name"] == "create_reservation"
    assert follow_up[-1]["content"].startswith("booked: Tanaka, 2 people at 19:00")
    offered = {t["function"]["name"] for t in chats[0].tools}
    assert offered == {
        "check_availability",
        "create_reservation",
        "find_reservation",
        "cancel_reservation",
    }
    assert "Today is Friday, 2026-11-20" in chats[0].messages[0]["content"]

    # Saying yes twice in the same call books nothing more.
    _, _, calls = d.say("yes, book it")
    assert calls[0].result.startswith("already booked in this call")
    assert len(stored(pg_dsn, persona)) == 1


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({**BOOKING, "party_size": 6}, "not booked: parties of 1 to 4 only (asked for 6)"),
        ({**BOOKING, "date": "2026-12-31"}, "not booked: closed on 2026-12-31"),
    ],
)
def test_refused_bookings_store_nothing_and_say_why(desk, pg_dsn, persona, arguments, reason):
    d = desk(
        [
            Rule(call("create_reservation", **arguments), user="book"),
            Rule("Sorry, we cannot take that booking.", after_tool="create_reservation"),
        ]
    )
    _, spoken, calls = d.say("Book it.")
    assert calls[0].result.startswith(reason)
    assert calls[0].error is None
    assert d.server.chat_requests()[-1].messages[-1]["content"] == calls[0].result
    assert spoken == "Sorry, we cannot take that booking."
    assert stored(pg_dsn, persona) == []


def test_full_slot_offers_free_times(desk, book, persona):
    rules = persona.restaurant
    for _ in range(3):  # 12 seats taken at 19:00
        book.book(
            restaurant=rules.name,
            seats_per_slot=rules.seats_per_slot,
            name="Other",
            day=parse_day("2026-12-05"),
            at=parse_hhmm("19:00"),
            party_size=4,
            requests="",
            conversation_id=uuid.uuid4(),
        )
    d = desk([Rule(call("check_availability", **SLOT, party_size=2), user="table")])
    _, _, calls = d.say("A table please")
    assert calls[0].result == (
        "not available: fully booked at 19:00 on 2026-12-05 (Saturday) (0 seats left); "
        "free that day for 2 people: 18:00, 18:30, 19:30"
    )


def test_unknown_tool_and_bad_arguments_are_told_to_the_model(desk, pg_dsn, persona):
    d = desk(
        [
            Rule(call("order_pizza", size="large"), user="pizza"),
            Rule(call("check_availability", date="2026-12-05", party_size="two"), user="table"),
            Rule("Let me try that again.", after_tool="order_pizza"),
            Rule("Which time would you like?", after_tool="check_availability"),
        ]
    )
    _, spoken, calls = d.say("Send me a pizza")
    assert calls[0].error == "unknown_tool" and calls[0].tool_ms is None
    told = d.server.chat_requests()[-1].messages[-1]
    assert told["role"] == "tool" and "no tool named 'order_pizza'" in told["content"]
    assert "check_availability" in told["content"]
    assert spoken == "Let me try that again."

    _, spoken, calls = d.say("A table on the fifth")
    assert calls[0].error == "invalid_arguments"
    told = d.server.chat_requests()[-1].messages[-1]["content"]
    assert "invalid arguments for check_availability" in told
    assert "time: Field required" in told and "party_size" in told
    assert spoken == "Which time would you like?"
    assert stored(pg_dsn, persona) == []


def slow_tool(seconds, *, timeout_s, name="slow_lookup"):
    class NoArgs(BaseModel):
        pass

    def run(context, args):
        context.cancelled.wait(seconds)
        return "done"

    return Tool(name, "A slow lookup.", NoArgs, run, timeout_s=timeout_s)


def test_a_tool_that_times_out_apologizes_once(persona, book, executor, caplog):
    caplog.set_level(logging.INFO)
    script = ConversationScript([Rule(call("slow_lookup"), user="look")], default="Done.")
    with OllamaProtocolServer("instant", script=script) as server:
        with make_client(server.base_url, timeout_s=5.0) as client:
            tools = Toolset(
                {"slow_lookup": slow_tool(5, timeout_s=0.3)},
                bind_tools(persona, uuid.uuid4(), clock=lambda: NOW).context,
            )
            loop = ToolLoop(OllamaChat(client, "m"), tools, executor=executor)
            reply = loop.reply([Message("user", "look it up")])
            events = list(reply)
        assert len(server.chat_requests()) == 1  # the model is not asked again
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert finished[0].record.error == "timeout"
    assert "timed out after 0.3 s" in finished[0].record.result
    assert [e for e in events if isinstance(e, str)] == [persona.tool_apology]
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == [
        "tool slow_lookup timed out after 0.3 s"
    ]


class BrokenBook:
    """A reservation book whose database is gone."""

    def seats_taken(self, *args, **kwargs):
        raise RuntimeError("the database is down")

    book = seats_taken


def test_a_tool_that_raises_apologizes_once_and_stores_nothing(desk, persona, caplog, pg_dsn):
    caplog.set_level(logging.INFO)
    d = desk(BOOKING_SCRIPT)
    d.toolset = dataclasses.replace(
        d.toolset, context=dataclasses.replace(d.toolset.context, reservations=BrokenBook())
    )
    d.loop.toolset = d.toolset
    _, spoken, calls = d.say("yes")
    assert calls[0].error == "failed" and "the database is down" in calls[0].result
    assert spoken == persona.tool_apology
    assert len(d.server.chat_requests()) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "create_reservation failed" in errors[0].getMessage()
    assert stored(pg_dsn, persona) == []


def test_without_a_database_the_tools_say_booking_is_unavailable(desk, persona, caplog):
    caplog.set_level(logging.INFO)
    sorry = Rule(
        "I'm sorry, we cannot book by phone today.",
        after_tool="create_reservation",
        result_contains="unavailable",
    )
    d = desk([sorry, *BOOKING_SCRIPT])
    d.toolset = dataclasses.replace(
        d.toolset, context=dataclasses.replace(d.toolset.context, reservations=None)
    )
    d.loop.toolset = d.toolset
    _, spoken, calls = d.say("yes")
    assert calls[0].error is None and calls[0].result.startswith("unavailable:")
    assert spoken == "I'm sorry, we cannot book by phone today."
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def hold_slot(pg_dsn, persona, released: threading.Event, held: threading.Event):
    """Hold the booking lock of BOOKING's slot until ``released`` (another booking in flight)."""
    with psycopg.connect(pg_dsn) as conn, conn.transaction():
        lock_slot(conn, persona.restaurant.name, parse_day(SLOT["date"]), parse_hhmm(SLOT["time"]))
        held.set()
        released.wait(10)


@pytest.mark.parametrize("how", ["cancel_event", "close"])
def test_cancel_during_a_booking_never_half_writes(desk, pg_dsn, persona, executor, how):
    d = desk(BOOKING_SCRIPT, filler_after_s=0.1)
    released, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_slot, args=(pg_dsn, persona, released, held))
    holder.start()
    held.wait(5)
    cancel = threading.Event()
    reply = d.loop.reply([Message("user", "yes")], cancel)
    seen = []
    for event in reply:
        seen.append(event)
        if isinstance(event, ToolFiller):  # the booking is waiting for the slot
            if how == "close":
                reply.close()
                break
            cancel.set()
    released.set()
    holder.join(5)
    executor.shutdown(wait=True)  # the booking thread has finished, one way or the other
    assert ToolFiller(persona.tool_filler) in seen
    assert not [e for e in seen if isinstance(e, str)]  # nothing more was said
    assert reply.tool_calls[-1].error == "cancelled"
    assert stored(pg_dsn, persona) == []
    assert len(d.server.chat_requests()) == 1


def test_a_booking_that_committed_before_the_cancel_stays_whole(desk, pg_dsn, persona):
    d = desk(BOOKING_SCRIPT)
    cancel = threading.Event()
    reply = d.loop.reply([Message("user", "yes")], cancel)
    for event in reply:
        if isinstance(event, ToolFinished):
            cancel.set()  # barge-in right after the tool answered
    assert reply.tool_calls[0].result.startswith("booked:")
    assert len(stored(pg_dsn, persona)) == 1


def test_filler_only_when_a_tool_is_slow(persona, executor):
    script = ConversationScript([Rule(call("slow_lookup"), user="look")], default="Here it is.")
    with OllamaProtocolServer("instant", script=script) as server:
        with make_client(server.base_url, timeout_s=5.0) as client:
            context = bind_tools(persona, uuid.uuid4(), clock=lambda: NOW).context
            for seconds, fillers in ((0.4, 1), (0.0, 0)):
                tools = Toolset({"slow_lookup": slow_tool(seconds, timeout_s=2)}, context)
                loop = ToolLoop(
                    OllamaChat(client, "m"), tools, executor=executor, filler_after_s=0.2
                )
                events = list(loop.reply([Message("user", "look it up")]))
                assert events.count(ToolFiller("One moment, I'll check.")) == fillers
                assert "".join(e for e in events if isinstance(e, str)) == "Here it is."


def test_tool_rounds_are_bounded(persona, executor):
    script = ConversationScript([], default=ScriptedReply("Hm.", (ScriptedToolCall("nope"),)))
    with OllamaProtocolServer("instant", script=script) as server:
        with make_client(server.base_url, timeout_s=5.0) as client:
            tools = bind_tools(persona, uuid.uuid4(), clock=lambda: NOW)
            loop = ToolLoop(OllamaChat(client, "m"), tools, executor=executor, max_rounds=2)
            reply = loop.reply([Message("user", "go")])
            text = [e for e in reply if isinstance(e, str)]
        chats = server.chat_requests()
    assert len(chats) == 3 and chats[-1].tools == [] and chats[0].tools
    assert text == ["Hm."] * 3
    assert len(reply.tool_calls) == 2


def test_registry_has_the_reservation_tools_with_their_signatures():
    tools = available_tools()
    create = tools["create_reservation"].schema()["function"]
    assert list(create["parameters"]["properties"]) == [
        "name",
        "date",
        "time",
        "party_size",
        "requests",
    ]
    assert create["parameters"]["required"] == ["name", "date", "time", "party_size"]
    check = tools["check_availability"].schema()["function"]["parameters"]
    assert list(check["properties"]) == ["date", "time", "party_size"]
    assert check["properties"]["party_size"]["type"] == "integer"
    assert "YYYY-MM-DD" in check["properties"]["date"]["description"]


def test_time_passes_in_the_personas_zone(desk, pg_dsn, persona):
    # 2026-12-04 16:00 UTC is already Saturday 01:00 in Tokyo: Friday the 4th has passed.
    d = desk([Rule(call("create_reservation", **{**BOOKING, "date": "2026-12-04"}), user="book")])
    d.toolset = bind_tools(
        persona,
        d.conversation_id,
        reservations=d.toolset.context.reservations,
        clock=lambda: datetime(2026, 12, 4, 16, 0, tzinfo=ZoneInfo("UTC")),
    )
    d.loop.toolset = d.toolset
    _, _, calls = d.say("book it")
    assert calls[0].result.startswith("not booked: 2026-12-04 is in the past")
    assert stored(pg_dsn, persona) == []


def test_speakable_chunks_play_the_words_before_a_tool_and_the_filler(persona, executor):
    from voicebot.chunking import Chunker
    from voicebot.tools.speech import speakable

    script = ConversationScript(
        [
            Rule(ScriptedReply("Let me see", (ScriptedToolCall("slow_lookup"),)), user="look"),
            Rule("It is sunny today. Anything else?", after_tool="slow_lookup"),
        ]
    )
    with OllamaProtocolServer("instant", script=script) as server:
        with make_client(server.base_url, timeout_s=5.0) as client:
            context = bind_tools(persona, uuid.uuid4(), clock=lambda: NOW).context
            tools = Toolset({"slow_lookup": slow_tool(0.4, timeout_s=2)}, context)
            loop = ToolLoop(OllamaChat(client, "m"), tools, executor=executor, filler_after_s=0.2)
            activity = []
            reply = loop.reply([Message("user", "look it up")])
            chunks = list(speakable(reply, Chunker(language="en"), activity.append))
    assert chunks == [
        "Let me see",
        "One moment, I'll check.",
        "It is sunny today.",
        "Anything else?",
    ]
    assert [type(a) for a in activity] == [ToolStarted, ToolFinished]
    assert activity[1].record.result == "done" and reply.tool_calls == [activity[1].record]


def test_find_and_cancel_tools(persona, book, pg_dsn):
    from voicebot.reservations import tools as desk_tools

    ctx = bind_tools(persona, uuid.uuid4(), reservations=book, clock=lambda: NOW).context
    booked = desk_tools.create_reservation(ctx, desk_tools.CreateArgs(**BOOKING))
    assert booked.startswith("booked: Tanaka, 2 people at 19:00 on 2026-12-05 (Saturday)")
    found = desk_tools.find_reservation(ctx, desk_tools.FindArgs(name="tanaka"))
    assert found.startswith("found: Tanaka, 2 people at 19:00 on 2026-12-05")
    wrong = desk_tools.cancel_reservation(
        ctx, desk_tools.CancelArgs(name="Tanaka", date="2026-12-05", time="20:00")
    )
    assert wrong.startswith("not cancelled: no booking under Tanaka at 20:00")
    done = desk_tools.cancel_reservation(ctx, desk_tools.CancelArgs(name="Tanaka", **SLOT))
    assert done.startswith("cancelled: Tanaka")
    assert desk_tools.find_reservation(ctx, desk_tools.FindArgs(name="Tanaka")) == (
        "no upcoming booking under the name Tanaka"
    )
    with psycopg.connect(pg_dsn) as conn:
        (cancelled_at,) = conn.execute(
            "SELECT cancelled_at FROM reservations WHERE restaurant = %s",
            (persona.restaurant.name,),
        ).fetchone()
    assert cancelled_at is not None  # kept, marked cancelled


def test_the_openai_backend_drives_the_same_tool_loop(pg_dsn, persona, book, executor):
    """Tool calls work on both backends: the OpenAI-protocol chat (vLLM, llama-server, LiteLLM)
    streams a tool call in pieces, the loop runs the real tool and sends its result back."""
    from voicebot.llm_openai import OpenAIChat, make_openai_client
    from voicebot.openai_server import OpenAIProtocolServer, ToolScript
    from voicebot.openai_server import ScriptedToolCall as OpenAIToolCall

    script = ToolScript(
        [OpenAIToolCall("check_availability", {**SLOT, "party_size": 2})],
        "Good news: {check_availability}",
    )
    with OpenAIProtocolServer("instant", script=script) as server:
        client = make_openai_client(server.base_url, api_key=None, timeout_s=5.0)
        try:
            tools = bind_tools(persona, uuid.uuid4(), reservations=book, clock=lambda: NOW)
            loop = ToolLoop(OpenAIChat(client, persona.llm_model), tools, executor=executor)
            messages = [Message("system", persona.system_prompt_at(NOW)), Message("user", "hi")]
            reply = loop.reply(messages, None)
            events = list(reply)
        finally:
            client.close()
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert [f.record.name for f in finished] == ["check_availability"]
    record = finished[0].record
    assert record.error is None and record.result
    spoken = "".join(e for e in events if isinstance(e, str))
    assert spoken == f"Good news: {record.result}"
    assert stored(pg_dsn, persona) == []  # checking books nothing
