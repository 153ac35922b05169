"""Gradio side of the page: turn updates from the handler become transcript bubbles and a
latency table."""

from __future__ import annotations

from typing import Any

from voicebot.handler import TurnUpdate

LATENCY_HEADER = (
    "| turn | endpoint | STT | LLM 1st token | TTS 1st audio | voice-to-voice | barge-in stop |\n"
    "|---:|---:|---:|---:|---:|---:|---:|"
)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def latency_row(update: TurnUpdate) -> str:
    """One markdown table row with the turn's timings."""
    t = update.turn.timings
    cells = [t.endpoint_ms, t.stt_ms, t.llm_ttft_ms, t.tts_first_ms, t.v2v_ms, t.bargein_stop_ms]
    return f"| {update.turn.sequence} | " + " | ".join(_ms(c) for c in cells) + " |"


def on_turn_update(
    chat: list[dict[str, Any]] | None, latency: str | None, update: TurnUpdate
) -> tuple[list[dict[str, Any]], str]:
    """Add or complete the bubbles of one turn; append its latencies once it is final."""
    messages = [dict(m) for m in (chat or [])]
    turn = update.turn
    key = str(turn.turn_id)
    user = next((m for m in messages if (m.get("metadata") or {}).get("id") == f"u-{key}"), None)
    if user is None:
        messages.append({"role": "user", "content": turn.user_text, "metadata": {"id": f"u-{key}"}})
    if update.final:
        text = turn.assistant_text or ""
        if turn.interrupted:
            text += " ⏹"
        if turn.error:
            text += f"\n\n⚠️ {turn.error}"
        messages.append({"role": "assistant", "content": text, "metadata": {"id": f"a-{key}"}})
        latency = (latency or LATENCY_HEADER) + "\n" + latency_row(update)
    return messages, latency or ""
