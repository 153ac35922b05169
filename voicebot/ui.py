"""The Gradio page: the call (persona picker, audio, live transcript, latencies) and the
conversation log (recent conversations; open one to read it or to continue it).

Imports gradio: only the page's builder imports this module.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from typing import Any, Protocol

import gradio as gr

from voicebot.conversation import ToolCallRecord, Turn
from voicebot.errors import StageError
from voicebot.handler import TurnUpdate
from voicebot.store import ConversationSummary

logger = logging.getLogger(__name__)

LATENCY_HEADER = (
    "| turn | endpoint | STT | LLM 1st token | TTS 1st audio | voice-to-voice | barge-in stop |\n"
    "|---:|---:|---:|---:|---:|---:|---:|"
)


class ConversationLog(Protocol):
    """What the page reads from the turn log."""

    def conversations(self, limit: int = 20) -> list[ConversationSummary]: ...

    def recent_turns(self, conversation_id: uuid.UUID, limit: int) -> list[Turn]: ...


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def latency_row(turn: Turn) -> str:
    """One markdown table row with the turn's timings."""
    t = turn.timings
    cells = [t.endpoint_ms, t.stt_ms, t.llm_ttft_ms, t.tts_first_ms, t.v2v_ms, t.bargein_stop_ms]
    return f"| {turn.sequence} | " + " | ".join(_ms(c) for c in cells) + " |"


def tool_line(call: ToolCallRecord) -> str:
    """One small line under the agent's bubble for a tool it called."""
    took = "" if call.tool_ms is None else f", {call.tool_ms:.0f} ms"
    result = call.result if len(call.result) <= 160 else call.result[:159] + "…"
    return f"🔧 *{call.name}* → {result}{took}"


def _assistant_text(turn: Turn) -> str:
    text = turn.assistant_text or ""
    if turn.interrupted:
        text += " ⏹"
    if turn.error:
        text += f"\n\n⚠️ {turn.error}"
    for call in turn.tool_calls:
        text += "\n\n" + tool_line(call)
    return text


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
        messages.append(
            {"role": "assistant", "content": _assistant_text(turn), "metadata": {"id": f"a-{key}"}}
        )
        latency = (latency or LATENCY_HEADER) + "\n" + latency_row(turn)
    return messages, latency or ""


class LiveTranscript:
    """The page's additional-outputs handler: keeps each call's transcript and latency table.

    FastRTC streams every update of a call through one Gradio event that was started with the
    component values of the moment the call began, so the handler never sees its own earlier
    output: the running state lives here, per conversation (the last ``max_calls``).
    """

    def __init__(self, max_calls: int = 256) -> None:
        self._calls: OrderedDict[uuid.UUID, tuple[list[dict[str, Any]], str]] = OrderedDict()
        self._max_calls = max_calls
        self._lock = threading.Lock()

    def __call__(
        self, chat: list[dict[str, Any]] | None, latency: str | None, update: TurnUpdate
    ) -> Any:
        if not isinstance(update, TurnUpdate):  # a CallStatus: not shown here (yet)
            return gr.skip(), gr.skip()
        key = update.turn.conversation_id
        with self._lock:
            chat, latency = self._calls.get(key, (chat, latency))
            state = on_turn_update(chat, latency, update)
            self._calls[key] = state
            self._calls.move_to_end(key)
            while len(self._calls) > self._max_calls:
                self._calls.popitem(last=False)
        return state


def transcript_messages(turns: list[Turn]) -> list[dict[str, str]]:
    """Chatbot messages for stored turns."""
    messages: list[dict[str, str]] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn.user_text})
        messages.append({"role": "assistant", "content": _assistant_text(turn)})
    return messages


def conversation_rows(summaries: list[ConversationSummary]) -> list[list[str]]:
    """Rows for the recent-conversations table."""
    return [
        [
            str(s.conversation_id),
            s.persona or "?",
            s.channel or "?",
            s.started_at.strftime("%Y-%m-%d %H:%M"),
            str(s.turns),
        ]
        for s in summaries
    ]


def add_conversation_log(log: ConversationLog, conversation_box: Any) -> None:
    """Render the conversation-log section inside the current ``gr.Blocks``.

    Picking a row shows its transcript and puts its id in ``conversation_box``, which the
    next call reads to continue that conversation.
    """

    def refresh() -> list[list[str]]:
        try:
            return conversation_rows(log.conversations(20))
        except StageError as e:
            logger.warning("%s", e)
            return []

    def open_row(rows: Any, event: gr.SelectData) -> tuple[list[dict[str, str]], str]:
        row = event.index[0] if isinstance(event.index, list | tuple) else event.index
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        conversation_id = uuid.UUID(str(values[row][0]))
        try:
            turns = log.recent_turns(conversation_id, 200)
        except StageError as e:
            logger.warning("%s", e)
            turns = []
        return transcript_messages(turns), str(conversation_id)

    with gr.Accordion("Conversation log", open=False):
        refresh_button = gr.Button("Refresh", size="sm")
        table = gr.Dataframe(
            headers=["conversation", "persona", "channel", "started", "turns"],
            value=refresh,
            interactive=False,
        )
        stored = gr.Chatbot(type="messages", label="Stored transcript", height=300)
        refresh_button.click(refresh, outputs=table)
        table.select(open_row, inputs=table, outputs=[stored, conversation_box])


def build_call_stream(
    handler: Any,
    personas: list[tuple[str, str]],
    default_persona: str,
    *,
    concurrency_limit: int,
    time_limit: float | None,
) -> Any:
    """The FastRTC stream behind the page: persona picker, optional conversation to continue,
    audio, the live transcript and each turn's latencies."""
    from fastrtc import Stream

    return Stream(
        handler,
        modality="audio",
        mode="send-receive",
        concurrency_limit=concurrency_limit,
        time_limit=time_limit,
        additional_inputs=[
            gr.Dropdown(choices=personas, value=default_persona, label="Persona"),
            gr.Textbox(
                label="Continue conversation (id, optional)",
                placeholder="pick one in the conversation log below",
            ),
        ],
        additional_outputs=[
            gr.Chatbot(type="messages", label="Transcript", height=420),
            gr.Markdown(label="Latency per turn"),
        ],
        additional_outputs_handler=LiveTranscript(),
        ui_args={
            "title": "voicebot",
            "subtitle": "Local voice agent: speak, and interrupt whenever you like.",
        },
        verbose=False,
    )
