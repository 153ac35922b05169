"""Tool declarations: personas name their tools (errors name the file and field), users add
tools through entry points, and each turn's tool calls reach the turn log."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest

from voicebot.conversation import Conversation, ToolCallRecord, Turn
from voicebot.errors import ConfigError
from voicebot.personas import load_persona
from voicebot.store import PostgresTurnStore, Spool, get_stored_turns, turn_record
from voicebot.tools.registry import ENTRY_POINT_GROUP, available_tools, bind_tools

PERSONAS = Path(__file__).resolve().parent.parent / "personas"


def persona_file(tmp_path: Path, name: str, extra: str) -> Path:
    base = (PERSONAS / "assistant-en.toml").read_text(encoding="utf-8")
    head, sampling = base.split("[sampling]")
    path = tmp_path / f"{name}.toml"
    text = head.replace('name = "assistant-en"', f'name = "{name}"')
    path.write_text(text + textwrap.dedent(extra) + "\n[sampling]" + sampling, encoding="utf-8")
    return path


def test_shipped_reservation_personas_declare_the_tools():
    for name in ("reservation-en", "reservation-ja"):
        persona = load_persona(PERSONAS / f"{name}.toml")
        assert {"check_availability", "create_reservation"} <= set(persona.tools)
        assert persona.timezone == "Asia/Tokyo" and persona.restaurant is not None
        assert persona.restaurant.name == "sakura"  # one restaurant, shared seats
        assert persona.tool_filler and persona.tool_apology
        assert "create_reservation" in persona.system_prompt
    assert load_persona(PERSONAS / "reservation-ja.toml").tool_filler == "確認いたします。"
    assert load_persona(PERSONAS / "reservation-en.toml").tool_filler == "One moment, I'll check."


def test_unknown_tool_names_the_file_and_field(tmp_path):
    path = persona_file(tmp_path, "p", 'tools = ["check_availability", "teleport"]\n')
    with pytest.raises(ConfigError) as e:
        load_persona(path)
    message = str(e.value)
    assert str(path) in message and "field 'tools[1]': unknown tool 'teleport'" in message
    assert "field 'restaurant': required by the tool 'check_availability'" in message


def test_bad_time_zone_and_rules_name_their_field(tmp_path):
    path = persona_file(tmp_path, "p", 'timezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError, match=r"field 'timezone'.*unknown time zone"):
        load_persona(path)
    path = persona_file(tmp_path, "q", '[restaurant]\nname = "x"\nclosed_days = ["31-12"]\n')
    with pytest.raises(ConfigError, match=r"q\.toml: field 'restaurant\.closed_days'.*MM-DD"):
        load_persona(path)


ENTRY_MODULE = """
from pydantic import BaseModel
from voicebot.tools.registry import Tool

class Args(BaseModel):
    city: str

def run(context, args):
    return f"sunny in {args.city}"

WEATHER = Tool("weather", "Today's weather in a city.", Args, run, timeout_s=1.0)
CLASH = Tool("create_reservation", "Mine.", Args, run)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A user's distribution with a ``voicebot.tools`` entry point, on sys.path."""

    def install(entry: str) -> None:
        (tmp_path / "my_tools.py").write_text(ENTRY_MODULE, encoding="utf-8")
        info = tmp_path / "my_tools-0.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tools\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        available_tools.cache_clear()

    yield install
    available_tools.cache_clear()


def test_entry_point_tools_are_available_to_personas(plugin, tmp_path):
    plugin("weather = my_tools:WEATHER")
    assert available_tools()["weather"].schema()["function"]["parameters"]["required"] == ["city"]
    persona = load_persona(persona_file(tmp_path, "w", 'tools = ["weather"]\n'))
    toolset = bind_tools(persona, uuid.uuid4())
    assert list(toolset.tools) == ["weather"] and toolset.schemas()[0]["function"]["name"] == (
        "weather"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("clash = my_tools:CLASH", "a tool named 'create_reservation' already exists"),
        ("broken = my_tools:MISSING", "cannot be loaded"),
        ("wrong = my_tools:run", "expected a voicebot.tools.registry.Tool"),
    ],
)
def test_bad_entry_points_are_config_errors(plugin, entry, message):
    plugin(entry)
    with pytest.raises(ConfigError, match=message) as e:
        available_tools()
    assert entry.split(" = ")[0] in str(e.value)


CALLS = [
    ToolCallRecord(
        "check_availability",
        {"date": "2026-12-05", "time": "19:00", "party_size": 2},
        "available: a table for 2 people at 19:00 on 2026-12-05 (Saturday)",
        tool_ms=12.5,
    ),
    ToolCallRecord(
        "order_pizza", {}, "error: there is no tool named 'order_pizza'", None, "unknown_tool"
    ),
]


def test_tool_calls_reach_the_turn_log(pg_dsn, tmp_path):
    conversation = Conversation(uuid.uuid4(), "reservation-en", "simulate")
    turn = Turn(
        conversation.conversation_id, 1, "a table", "Free at seven.", tool_calls=list(CALLS)
    )
    plain = Turn(conversation.conversation_id, 2, "thanks", "Bye.")
    with PostgresTurnStore(pg_dsn, tmp_path / "spool.jsonl") as store:
        store.open_conversation(conversation)
        store.record(turn)
        store.record(plain)
        assert store.flush(10)
    with psycopg.connect(pg_dsn) as conn:
        back = get_stored_turns(conn, conversation.conversation_id, 10)
        raw = conn.execute(
            "SELECT tool_calls FROM turns WHERE id = %s", (turn.turn_id,)
        ).fetchone()[0]
    assert [s.turn for s in back] == [turn, plain]
    assert raw[0] == {
        "name": "check_availability",
        "arguments": {"date": "2026-12-05", "time": "19:00", "party_size": 2},
        "result": CALLS[0].result,
        "tool_ms": 12.5,
        "error": None,
    }
    assert raw[1]["error"] == "unknown_tool"


def test_tool_calls_survive_the_spool(pg_dsn, tmp_path):
    turn = Turn(uuid.uuid4(), 1, "a table", "ok", tool_calls=list(CALLS))
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append([json.loads(json.dumps(turn_record(turn)))])
    (record,) = Spool.read(spool.path)
    with PostgresTurnStore(pg_dsn, tmp_path / "spool.jsonl") as store:
        assert store.flush(10)
    with psycopg.connect(pg_dsn) as conn:
        (back,) = get_stored_turns(conn, turn.conversation_id, 10)
    assert record["tool_calls"][0]["name"] == "check_availability"
    assert back.turn.tool_calls == CALLS
