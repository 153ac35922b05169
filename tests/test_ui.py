"""The Gradio page: turn updates become bubbles and latency rows; the conversation log lists
and opens what the turn log holds (real PostgreSQL)."""

from __future__ import annotations

import re
import socket
import uuid
from dataclasses import replace

import httpx
import pytest

from tests import fakes
from voicebot.call.status import CallStatus
from voicebot.conversation import Conversation, Timings, Turn
from voicebot.handler import TurnUpdate
from voicebot.settings import Settings
from voicebot.store import PostgresTurnStore
from voicebot.ui import (
    PAGE_CSS,
    LiveTranscript,
    conversation_rows,
    latency_html,
    on_turn_update,
    status_html,
    status_language,
    transcript_messages,
)


def _turn(seq: int, **kw: object) -> Turn:
    values: dict[str, object] = {
        "conversation_id": uuid.uuid4(),
        "sequence": seq,
        "user_text": f"question {seq}",
        "assistant_text": f"answer {seq}",
        "timings": Timings(
            endpoint_ms=300, stt_ms=200, llm_ttft_ms=150, tts_first_ms=90, v2v_ms=800
        ),
    }
    return Turn(**{**values, **kw})  # type: ignore[arg-type]


def test_captions_grow_one_assistant_bubble_and_the_final_text_replaces_them() -> None:
    turn = _turn(1, assistant_text="")
    chat = on_turn_update(None, TurnUpdate(turn, final=False))  # voice-to-voice only
    assert chat == [
        {"role": "user", "content": "question 1", "metadata": {"id": f"u-{turn.turn_id}"}}
    ]
    for caption in ("First.", "First. Second"):
        chat = on_turn_update(chat, TurnUpdate(replace(turn, assistant_text=caption), False))
    assert [(m["role"], m["content"]) for m in chat] == [
        ("user", "question 1"),
        ("assistant", "First. Second"),
    ]
    heard = replace(turn, assistant_text="First. Sec…", interrupted=True)
    chat = on_turn_update(chat, TurnUpdate(heard, final=True))
    assert [m["content"] for m in chat] == ["question 1", "First. Sec… — (interrupted)"]
    assert on_turn_update(None, TurnUpdate(heard, final=True), "ja")[1]["content"].endswith(
        "…（中断）"
    )


def test_the_greeting_is_the_first_bubble_without_a_user_bubble() -> None:
    greeting = Turn(uuid.uuid4(), 0, "", assistant_text="Hi,")
    chat = on_turn_update(None, TurnUpdate(greeting, final=False))
    chat = on_turn_update(
        chat, TurnUpdate(replace(greeting, assistant_text="Hi, I am here."), True)
    )
    assert [(m["role"], m["content"]) for m in chat] == [("assistant", "Hi, I am here.")]


def test_live_outputs_keep_the_transcript_and_chart_per_call_and_status_in_its_language() -> None:
    live = LiveTranscript()
    ja_idle = status_html("idle", "ja")
    turn = _turn(1)
    chat, status, latency = live([], ja_idle, "", TurnUpdate(turn, final=True))
    assert chat[-1]["content"] == "answer 1"
    assert latency.count('class="vb-chart-row"') == 1
    assert status == {"__type__": "update"}  # left as it is
    chat, status, latency = live([], ja_idle, "", CallStatus("thinking"))
    assert chat == latency == {"__type__": "update"}
    assert "考えています" in status and 'data-state="thinking"' in status
    assert status_language(status) == "ja"
    error = live([], status_html("idle", "en"), "", CallStatus("error", "start it: `ollama serve`"))
    assert "Something went wrong" in error[1] and "`ollama serve`" in error[1]
    # A later update of the same call starts from what the handler kept, not the page's start.
    chat, _, latency = live(
        [], ja_idle, "", TurnUpdate(_turn(2, conversation_id=turn.conversation_id), True)
    )
    assert [m["content"] for m in chat] == ["question 1", "answer 1", "question 2", "answer 2"]
    assert latency.count('class="vb-chart-row"') == 2


def test_latency_chart_stacks_the_parts_on_one_scale_and_the_table_has_every_figure() -> None:
    fast, slow = _turn(1), _turn(2)
    slow.timings.stt_ms = 1200
    slow.timings.first_sound_ms = 700  # an acknowledgement played before the slow answer
    page = latency_html([fast, slow])
    widths = [float(w) for w in re.findall(r"width:([0-9.]+)%", page)]
    assert len(widths) == 8  # endpoint, STT, LLM, TTS per turn
    assert sum(widths[4:]) == pytest.approx(100, abs=0.1)  # the slowest turn fills the track
    assert sum(widths[:4]) == pytest.approx(100 * 740 / 1740, abs=0.1)
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert cells[:8] == ["1", "300", "200", "150", "90", "800", "–", "–"]
    assert cells[8:16] == ["2", "300", "1200", "150", "90", "800", "700", "–"]
    assert "white-space" not in page  # the stylesheet keeps headers on one line


def test_picking_a_japanese_persona_puts_the_status_line_in_japanese() -> None:
    from voicebot.handler import VoiceHandler
    from voicebot.ui import build_call_stream

    runtime = fakes.runtime()
    stream = build_call_stream(
        VoiceHandler(runtime, persona_from_ui=True),
        [("Test", "test-en"), ("日本語", "test-ja")],
        "test-en",
        concurrency_limit=2,
        time_limit=None,
        languages={"test-en": "en", "test-ja": "ja"},
    )
    picked = next(d.fn for d in stream.ui.fns.values() if d.name == "persona_picked")
    assert status_language(picked("test-ja")) == "ja" and "話しかけて" in picked("test-ja")
    assert "speak" in picked("test-en")


def test_interrupted_and_failed_turns_are_marked() -> None:
    turn = _turn(2, interrupted=True, error="llm: Ollama unreachable")
    messages = transcript_messages([turn])
    assert "(interrupted)" in messages[1]["content"]
    assert "Ollama unreachable" in messages[1]["content"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_page_lists_recent_conversations_from_the_turn_log(pg_dsn: str, tmp_path) -> None:
    from voicebot.app import build_page, build_stream

    store = PostgresTurnStore(pg_dsn, tmp_path / "spool.jsonl").start()
    try:
        conversation = Conversation(uuid.uuid4(), "test-en", "simulate")
        store.open_conversation(conversation)
        turn = _turn(1)
        turn.conversation_id = conversation.conversation_id
        store.record(turn)
        assert store.flush(5)
        rows = conversation_rows(store.conversations(50))
        row = next(r for r in rows if r[0] == str(conversation.conversation_id))
        assert row[1:3] == ["test-en", "simulate"] and row[4] == "1"

        runtime = fakes.runtime(store=store)
        page = build_page(build_stream(runtime, Settings(concurrency_limit=3)), runtime)
        port = _free_port()
        page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).json()
            labels = {c.get("props", {}).get("label") for c in config["components"]}
            assert {"Persona", "Transcript", "Stored transcript"} <= labels
            texts = str(config)
            assert "Conversation log" in texts and "Continue this conversation" in texts
            # The page's stylesheet is served, first: FastRTC's ends with a stray ";".
            assert config["css"].startswith(PAGE_CSS.read_text(encoding="utf-8"))
        finally:
            page.close()
    finally:
        store.close()


@pytest.mark.parametrize("limit", [3])
def test_stream_concurrency_limit_is_explicit(limit: int) -> None:
    from voicebot.app import build_stream

    stream = build_stream(fakes.runtime(), Settings(concurrency_limit=limit, time_limit_s=60))
    assert stream.concurrency_limit == limit
    assert stream.time_limit == 60
