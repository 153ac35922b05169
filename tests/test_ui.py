"""The Gradio page: turn updates become bubbles and latency rows; the conversation log lists
and opens what the turn log holds (real PostgreSQL)."""

from __future__ import annotations

import socket
import uuid

import httpx
import pytest

from tests import fakes
from voicebot.conversation import Conversation, Timings, Turn
from voicebot.handler import TurnUpdate
from voicebot.settings import Settings
from voicebot.store import PostgresTurnStore
from voicebot.ui import LATENCY_HEADER, conversation_rows, on_turn_update, transcript_messages


def _turn(seq: int, **kw: object) -> Turn:
    return Turn(
        conversation_id=uuid.uuid4(),
        sequence=seq,
        user_text=f"question {seq}",
        assistant_text=f"answer {seq}",
        timings=Timings(endpoint_ms=300, stt_ms=200, llm_ttft_ms=150, tts_first_ms=90, v2v_ms=800),
        **kw,  # type: ignore[arg-type]
    )


def test_turn_updates_make_one_bubble_pair_and_one_latency_row() -> None:
    turn = _turn(1)
    chat, latency = on_turn_update(None, None, TurnUpdate(turn, final=False))
    assert chat == [
        {"role": "user", "content": "question 1", "metadata": {"id": f"u-{turn.turn_id}"}}
    ]
    assert latency == ""
    chat, latency = on_turn_update(chat, latency, TurnUpdate(turn, final=True))
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert chat[1]["content"] == "answer 1"
    assert latency.startswith(LATENCY_HEADER)
    assert latency.splitlines()[-1] == "| 1 | 300 ms | 200 ms | 150 ms | 90 ms | 800 ms | – |"


def test_interrupted_and_failed_turns_are_marked() -> None:
    turn = _turn(2, interrupted=True, error="llm: Ollama unreachable")
    messages = transcript_messages([turn])
    assert "⏹" in messages[1]["content"] and "Ollama unreachable" in messages[1]["content"]


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
            assert "Conversation log" in texts
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
