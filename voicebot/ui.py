"""The Gradio page: the call (persona picker, audio, status line, live transcript with captions,
latencies as a chart and a table) and the conversation log (recent conversations; open one to
read it or to continue it).

Imports gradio: only the page's builder imports this module.
"""

from __future__ import annotations

import html
import logging
import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gradio as gr

from voicebot.call.status import CallState, CallStatus
from voicebot.conversation import ToolCallRecord, Turn
from voicebot.errors import StageError
from voicebot.handler import TurnUpdate
from voicebot.store import ConversationSummary

logger = logging.getLogger(__name__)

PAGE_CSS = Path(__file__).parent / "assets" / "page.css"

STATUS_WORDS: dict[str, dict[str, str]] = {
    "en": {
        "idle": "Press the microphone button, then speak",
        "listening": "Listening",
        "user_speaking": "Hearing you",
        "thinking": "Thinking…",
        "speaking": "Speaking",
        "paused": "Paused: you spoke over me",
        "closing": "Ending the call",
        "error": "Something went wrong",
    },
    "ja": {
        "idle": "マイクのボタンを押して、話しかけてください",
        "listening": "聞いています",
        "user_speaking": "お話を聞いています",
        "thinking": "考えています…",
        "speaking": "話しています",
        "paused": "一時停止中（お話が重なりました）",
        "closing": "通話を終了しています",
        "error": "問題が発生しました",
    },
}
"""The status line's words per persona language (English for any other)."""

LATENCY_PARTS = (("endpoint", "endpoint"), ("stt", "STT"), ("llm", "LLM"), ("tts", "TTS"))
"""The stacked bar's segments, in the order they happen: CSS class and legend label."""

LATENCY_COLUMNS = (
    ("turn", "turn number"),
    ("endpoint", "end of speech to the turn closed"),
    ("STT", "speech to text"),
    ("LLM", "LLM first token"),
    ("TTS", "text to speech, first audio"),
    ("v2v", "voice to voice: end of speech to the first reply audio"),
    ("sound", "first sound: end of speech to the first audio heard, the acknowledgement included"),
    ("barge-in", "barge-in: start of the interruption to the agent silent"),
)
"""The table's short headers (it sits in a third of a 1280 px page) and what each means."""

_LANG_ATTR = re.compile(r'data-lang="([a-z]{2})"')


class ConversationLog(Protocol):
    """What the page reads from the turn log."""

    def conversations(self, limit: int = 20) -> list[ConversationSummary]: ...

    def recent_turns(self, conversation_id: uuid.UUID, limit: int) -> list[Turn]: ...


# --- the status line ---------------------------------------------------------------------------


def status_html(state: CallState | str, language: str = "en", detail: str | None = None) -> str:
    """The status line; ``data-lang`` carries the persona's language into the call's updates."""
    words = STATUS_WORDS.get(language, STATUS_WORDS["en"])
    lang = language if language in STATUS_WORDS else "en"
    text = html.escape(words.get(state, state))
    extra = f'<div class="vb-detail">{html.escape(detail)}</div>' if detail else ""
    return (
        f'<div class="vb-status vb-{html.escape(state)}" data-state="{html.escape(state)}" '
        f'data-lang="{lang}" role="status" aria-live="polite"><span class="vb-dot"></span>'
        f'<div><div class="vb-words">{text}</div>{extra}</div></div>'
    )


def tool_line(call: ToolCallRecord) -> str:
    """One small line under the agent's bubble for a tool it called."""
    took = "" if call.tool_ms is None else f", {call.tool_ms:.0f} ms"
    result = call.result if len(call.result) <= 160 else call.result[:159] + "…"
    return f"🔧 *{call.name}* → {result}{took}"


def status_language(value: str | None) -> str:
    """The language a status line was rendered in (English when unknown)."""
    match = _LANG_ATTR.search(value or "")
    return match[1] if match else "en"


# --- the transcript ----------------------------------------------------------------------------


CUT_MARK = {"en": " — (interrupted)", "ja": "（中断）"}
"""After an interrupted reply, whose text already ends with "…" where the user cut in."""


def _assistant_text(turn: Turn, language: str = "en") -> str:
    text = turn.assistant_text or ""
    if turn.interrupted:
        text += CUT_MARK.get(language, CUT_MARK["en"])
    if turn.error:
        text += f"\n\n⚠️ {turn.error}"
    for call in turn.tool_calls:
        text += "\n\n" + tool_line(call)
    return text


def _find(messages: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((m for m in messages if (m.get("metadata") or {}).get("id") == key), None)


def on_turn_update(
    chat: list[dict[str, Any]] | None, update: TurnUpdate, language: str = "en"
) -> list[dict[str, Any]]:
    """The transcript with one turn's bubbles added or brought up to date.

    A turn's assistant bubble grows with each caption update (the chunks that have started
    playing) and gets its final text (what was heard, cut mark included) with the final one.
    The greeting (sequence 0, no user text) is an assistant bubble alone.
    """
    messages = [dict(m) for m in (chat or [])]
    turn = update.turn
    key = str(turn.turn_id)
    if turn.user_text and _find(messages, f"u-{key}") is None:
        messages.append({"role": "user", "content": turn.user_text, "metadata": {"id": f"u-{key}"}})
    text = _assistant_text(turn, language) if update.final else turn.assistant_text
    if not text:
        return messages  # e.g. the update that only carries the voice-to-voice time
    bubble = _find(messages, f"a-{key}")
    if bubble is None:
        messages.append({"role": "assistant", "content": text, "metadata": {"id": f"a-{key}"}})
    else:
        bubble["content"] = text
    return messages


def transcript_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Chatbot messages for stored turns."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        if turn.user_text:
            messages.append({"role": "user", "content": turn.user_text})
        messages.append({"role": "assistant", "content": _assistant_text(turn)})
    return messages


# --- latencies ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def latency_parts(turn: Turn) -> list[tuple[str, float]]:
    """The measured parts of a turn's wait, in order: endpoint, STT, LLM (to its first speakable
    chunk, else its first token) and TTS first audio."""
    t = turn.timings
    llm = t.llm_first_chunk_ms if t.llm_first_chunk_ms is not None else t.llm_ttft_ms
    values = (t.endpoint_ms, t.stt_ms, llm, t.tts_first_ms)
    return [(css, max(0.0, v)) for (css, _), v in zip(LATENCY_PARTS, values, strict=True) if v]


def latency_html(turns: list[Turn]) -> str:
    """Per turn, a stacked bar of where the wait went, then the table of every figure."""
    if not turns:
        return '<div class="vb-latency"><span class="vb-empty">Latency per turn</span></div>'
    scale = max(
        [sum(v for _, v in latency_parts(t)) for t in turns]
        + [t.timings.v2v_ms or 0.0 for t in turns]
        + [1.0]
    )
    legend = "".join(f'<span class="vb-{css}">{label}</span>' for css, label in LATENCY_PARTS)
    rows = []
    for turn in turns:
        segments = "".join(
            f'<div class="vb-seg vb-{css}" style="width:{100 * v / scale:.2f}%" '
            f'title="{css} {v:.0f} ms"></div>'
            for css, v in latency_parts(turn)
        )
        v2v = turn.timings.v2v_ms
        total = "–" if v2v is None else f"{v2v:.0f} ms"
        rows.append(
            f'<div class="vb-chart-row" data-turn="{turn.sequence}">'
            f'<span class="vb-turn">{turn.sequence}</span>'
            f'<div class="vb-track">{segments}</div><span class="vb-total">{total}</span></div>'
        )
    header = (
        "<tr>"
        + "".join(
            f'<th title="{html.escape(title)}">{label}</th>' for label, title in LATENCY_COLUMNS
        )
        + "</tr>"
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{c}</td>"
            for c in (
                str(t.sequence),
                _ms(t.timings.endpoint_ms),
                _ms(t.timings.stt_ms),
                _ms(t.timings.llm_ttft_ms),
                _ms(t.timings.tts_first_ms),
                _ms(t.timings.v2v_ms),
                _ms(t.timings.first_sound_ms),
                _ms(t.timings.bargein_stop_ms),
            )
        )
        + "</tr>"
        for t in turns
    )
    return (
        '<div class="vb-latency"><div class="vb-legend">'
        + legend
        + '<span class="vb-unit">all in ms; voice to voice on the right</span></div>'
        + "".join(rows)
        + f'<div class="vb-table-wrap"><table class="vb-table"><thead>{header}</thead>'
        + f"<tbody>{body}</tbody></table></div></div>"
    )


# --- the call's live outputs -------------------------------------------------------------------


@dataclass
class _CallView:
    messages: list[dict[str, Any]]
    timed: list[Turn] = field(default_factory=list)  # final turns with their timings


class LiveTranscript:
    """The page's additional-outputs handler: the status line, transcript and latencies.

    FastRTC streams every update of a call through one Gradio event that was started with the
    component values of the moment the call began, so the handler never sees its own earlier
    output: the running transcript lives here, per conversation (the last ``max_calls``). A
    ``CallStatus`` carries no conversation: it only replaces the status line, in the language
    the line had when the call began (the persona picked).
    """

    def __init__(self, max_calls: int = 256) -> None:
        self._calls: OrderedDict[uuid.UUID, _CallView] = OrderedDict()
        self._max_calls = max_calls
        self._lock = threading.Lock()

    def __call__(
        self,
        chat: list[dict[str, Any]] | None,
        status: str | None,
        latency: str | None,
        update: TurnUpdate | CallStatus,
    ) -> tuple[Any, Any, Any]:
        if isinstance(update, CallStatus):
            line = status_html(update.state, status_language(status), update.detail)
            return gr.skip(), line, gr.skip()
        key = update.turn.conversation_id
        with self._lock:
            view = self._calls.get(key) or _CallView(list(chat or []))
            view.messages = on_turn_update(view.messages, update, status_language(status))
            if update.final and update.turn.sequence > 0:
                view.timed.append(update.turn)
            self._calls[key] = view
            self._calls.move_to_end(key)
            while len(self._calls) > self._max_calls:
                self._calls.popitem(last=False)
            return view.messages, gr.skip(), latency_html(view.timed)


# --- the conversation log ----------------------------------------------------------------------


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


def add_conversation_log(
    log: ConversationLog,
    conversation_box: Any,
    *,
    persona_box: Any = None,
    transcript: Any = None,
    personas: list[str] | None = None,
) -> None:
    """Render the conversation-log section inside the current ``gr.Blocks``.

    Picking a row shows its transcript; "Continue this conversation" puts its id in
    ``conversation_box`` (the next call reads it to continue that conversation), picks its
    persona in ``persona_box`` and shows what was said so far in the call's ``transcript``.
    """

    def refresh() -> list[list[str]]:
        try:
            return conversation_rows(log.conversations(20))
        except StageError as e:
            logger.warning("%s", e)
            return []

    def open_row(rows: Any, event: gr.SelectData) -> tuple[list[dict[str, Any]], str, Any]:
        row = event.index[0] if isinstance(event.index, list | tuple) else event.index
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        conversation_id = uuid.UUID(str(values[row][0]))
        try:
            turns = log.recent_turns(conversation_id, 200)
        except StageError as e:
            logger.warning("%s", e)
            turns = []
        picked = f"{values[row][1]}|{conversation_id}"
        return transcript_messages(turns), picked, gr.update(interactive=bool(turns))

    def continue_picked(picked: str, stored: list[dict[str, Any]]) -> tuple[Any, ...]:
        if not picked:
            return gr.skip(), gr.skip(), gr.skip()
        persona, conversation_id = picked.split("|", 1)
        chosen = persona if personas is None or persona in personas else gr.skip()
        return conversation_id, chosen, stored

    with gr.Accordion("Conversation log", open=False, elem_id="vb-log"):
        with gr.Row():
            refresh_button = gr.Button("Refresh", size="sm", scale=0)
            continue_button = gr.Button(
                "Continue this conversation",
                size="sm",
                variant="primary",
                interactive=False,
                scale=0,
                elem_id="vb-continue",
            )
        table = gr.Dataframe(
            headers=["conversation", "persona", "channel", "started", "turns"],
            value=refresh,
            interactive=False,
        )
        stored = gr.Chatbot(type="messages", label="Stored transcript", height=300)
        picked = gr.State("")
        refresh_button.click(refresh, outputs=table)
        table.select(open_row, inputs=table, outputs=[stored, picked, continue_button])
        continue_button.click(
            continue_picked,
            inputs=[picked, stored],
            outputs=[
                conversation_box,
                persona_box if persona_box is not None else gr.State(),
                transcript if transcript is not None else gr.State(),
            ],
        )


# --- the stream --------------------------------------------------------------------------------


def build_call_stream(
    handler: Any,
    personas: list[tuple[str, str]],
    default_persona: str,
    *,
    concurrency_limit: int,
    time_limit: float | None,
    languages: dict[str, str] | None = None,
    rtc_configuration: dict[str, Any] | None = None,
) -> Any:
    """The FastRTC stream behind the page: persona picker, optional conversation to continue,
    audio, the status line, the live transcript and each turn's latencies.

    ``languages`` maps persona names to their language: the status line speaks it.
    ``rtc_configuration`` (ICE servers) goes to the browser and to the server's side of each
    call.
    """
    from fastrtc import Stream

    languages = languages or {}
    outputs = [
        gr.Chatbot(type="messages", label="Transcript", height=420, elem_id="vb-transcript"),
        gr.HTML(
            status_html("idle", languages.get(default_persona, "en")),
            label="Status",
            elem_id="vb-status",
        ),
        gr.HTML(latency_html([]), label="Latency per turn", elem_id="vb-latency"),
    ]
    persona_box = gr.Dropdown(choices=personas, value=default_persona, label="Persona")
    stream = Stream(
        handler,
        modality="audio",
        mode="send-receive",
        concurrency_limit=concurrency_limit,
        time_limit=time_limit,
        rtc_configuration=rtc_configuration,
        server_rtc_configuration=rtc_configuration,
        additional_inputs=[
            persona_box,
            gr.Textbox(
                label="Continue conversation (id, optional)",
                placeholder="pick one in the conversation log below",
            ),
        ],
        additional_outputs=outputs,
        additional_outputs_handler=LiveTranscript(),
        ui_args={
            "title": "voicebot",
            "subtitle": "Local voice agent: speak, and interrupt whenever you like.",
        },
        verbose=False,
    )
    status_box = outputs[1]

    def persona_picked(name: str) -> str:
        return status_html("idle", languages.get(name, "en"))

    # Re-entering the stream's Blocks adds the event to the page FastRTC built.
    with stream.ui:
        persona_box.change(persona_picked, inputs=persona_box, outputs=status_box)
    # Ours first: FastRTC's stylesheet ends with a stray ";" that would void the next rule.
    stream.ui.css = PAGE_CSS.read_text(encoding="utf-8") + "\n" + (stream.ui.css or "")
    return stream


def build_page(
    stream: Any, log: ConversationLog | None = None, personas: list[str] | None = None
) -> Any:
    """The page to serve: the stream's UI, plus the conversation log when there is one
    (``personas``: the names a continued conversation's persona may be picked from)."""
    if log is None:
        return stream.ui
    persona_box, conversation_box = stream.additional_input_components[:2]
    with gr.Blocks(title="voicebot", analytics_enabled=False, css=stream.ui.css) as page:
        stream.ui.render()
        add_conversation_log(
            log,
            conversation_box,
            persona_box=persona_box,
            transcript=stream.additional_output_components[0],
            personas=personas,
        )
    return page
