"""Preemptive replies on a virtual clock: the answer is prepared at the first pause with its
audio held, played at once when the turn ends there, dropped when the user goes on."""

from __future__ import annotations

import json
import logging
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import typer

from tests import fakes
from tests.fakes import silence, tone
from voicebot.bench.report import format_table, summarize
from voicebot.bench.runner import Measurement
from voicebot.call.clock import VirtualClock
from voicebot.call.session import Call
from voicebot.call.status import CallStatus
from voicebot.cli import _preemptive_list
from voicebot.llm import OllamaChat, make_client
from voicebot.metrics import Metrics
from voicebot.ollama_server import (
    ConversationScript,
    OllamaProtocolServer,
    Rule,
    ScriptedReply,
    ScriptedToolCall,
)
from voicebot.reservations.rules import RestaurantRules
from voicebot.runtime import PersonaStack, Runtime
from voicebot.simulate import SimulationResult, simulate_call
from voicebot.turns import TurnConfig


def _call(
    *,
    preemptive: bool,
    audio: np.ndarray,
    chat: fakes.FakeChat,
    transcriber: fakes.FakeTranscriber | None = None,
    synthesizer: fakes.ToneSynthesizer | None = None,
    end_silence_ms: int = 320,
    observer: Metrics | None = None,
) -> tuple[SimulationResult, Call]:
    clock = VirtualClock()
    config = TurnConfig(end_silence_ms=end_silence_ms, preemptive_replies=preemptive)
    rt = fakes.runtime(
        clock=clock,
        chat=chat,
        transcriber=transcriber,
        synthesizer=synthesizer,
        config=config,
    )
    call = Call(rt, channel="simulate", greet=False, clock=clock, observer=observer)
    result = simulate_call(rt, (16000, audio), clock=clock, call=call)
    return result, call


ONE_TURN = ["listening", "user_speaking", "thinking", "speaking", "listening"]
"""The page's states over a one-turn call: a held reply never shows before it plays."""


def _states(result: SimulationResult) -> list[str]:
    return [o.state for o in result.outputs if isinstance(o, CallStatus)]


def test_a_confirmed_turn_plays_the_held_reply_sooner_with_one_llm_request() -> None:
    audio = np.concatenate([silence(0.4), tone(0.8), silence(2.5)])
    v2v: dict[bool, float] = {}
    head_start_ms = 0.0
    for preemptive in (False, True):
        # LLM first token 250 ms: the turn closes 320 ms after speech, the early transcript
        # is in at ~180 ms, so a preemptive reply has ~140 ms of the LLM done at the close.
        chat = fakes.FakeChat(reply="Sure, here you are. And more.", ttft_s=0.25)
        result, call = _call(preemptive=preemptive, audio=audio, chat=chat)
        [turn] = result.turns
        assert turn.sequence == 1 and turn.user_text == "hello there"
        assert turn.assistant_text == chat.reply and not turn.interrupted
        assert len(chat.requests) == 1  # asked once, preemptive or not
        assert call.wasted_llm_requests == 0
        assert call.preemptive_played == int(preemptive)
        head_start_ms += call.preemptive_head_start_ms
        t = turn.timings
        assert t.endpoint_ms == pytest.approx(320, abs=25)
        assert t.v2v_ms is not None and t.v2v_ms >= t.endpoint_ms  # never before the close
        v2v[preemptive] = t.v2v_ms
        # The page: the held reply never shows before the turn is confirmed.
        assert _states(result)[:5] == ONE_TURN
        # reply audio on the timeline after the speech end plus the endpointing wait
        rate, reply = result.reply_audio
        first_out = np.flatnonzero(np.abs(reply) > 0.01)[0] / rate
        assert first_out >= 1.2 + 0.3
        [final] = [u for u in result.updates if u.final]
        assert final.turn.sequence == 1
    # What the preemptive reply saves: the part of the LLM done during the wait, its head
    # start (the early transcript is in ~180 ms after the speech end, the turn closes at 320).
    assert head_start_ms == pytest.approx(140, abs=30)
    assert v2v[False] - v2v[True] == pytest.approx(head_start_ms, abs=30), v2v


def _draft_call(drafts: tuple[str, ...], final: str = "Hello there.") -> tuple[Any, Call, Any]:
    """One turn whose full transcript takes 0.3 s (in ~440 ms after the speech end, after
    the 320 ms close), with or without a quick draft (10 ms) to start the answer on."""
    audio = np.concatenate([silence(0.4), tone(0.8), silence(2.5)])
    chat = fakes.FakeChat(reply="Sure, here you are. And more.", ttft_s=0.25)
    transcriber = fakes.FakeTranscriber([final], delay_s=0.3, drafts=drafts)
    result, call = _call(preemptive=True, audio=audio, chat=chat, transcriber=transcriber)
    return result, call, chat


def test_an_answer_started_on_a_draft_plays_once_the_transcript_agrees() -> None:
    plain, _, _ = _draft_call(drafts=())
    result, call, chat = _draft_call(drafts=("hello there",))
    [turn] = result.turns
    [slow] = plain.turns
    # The turn keeps the transcript's own text, not the draft's; one LLM request.
    assert turn.user_text == "Hello there." and turn.sequence == 1
    assert [m.content for m in chat.requests[0] if m.role == "user"] == ["hello there"]
    assert len(chat.requests) == 1 and call.wasted_llm_requests == 0
    assert call.preemptive_played == 1
    assert turn.assistant_text == chat.reply and not turn.interrupted
    t = turn.timings
    assert t.stt_ms == pytest.approx(120, abs=30)  # the wait for the check after the close
    assert t.v2v_ms is not None and slow.timings.v2v_ms is not None
    # The LLM had been asked ~300 ms earlier: the first token came before the check.
    assert slow.timings.v2v_ms - t.v2v_ms > 200, (slow.timings.v2v_ms, t.v2v_ms)
    assert t.v2v_ms >= 440  # never before the transcript agreed
    assert _states(result)[:5] == ONE_TURN


def test_a_draft_the_transcript_contradicts_is_dropped_and_the_turn_answered_afresh() -> None:
    result, call, chat = _draft_call(drafts=("hello bear",))
    [turn] = result.turns
    assert turn.user_text == "Hello there." and not turn.interrupted
    assert [r[-1].content for r in chat.requests] == ["hello bear", "Hello there."]
    assert call.wasted_llm_requests == 1 and call.preemptive_played == 0
    # Heard once: the dropped answer's audio never played.
    assert turn.assistant_text == chat.reply
    assert [u.turn.user_text for u in result.updates if u.final] == ["Hello there."]


def test_a_draft_that_comes_after_the_close_still_starts_the_answer() -> None:
    """The worker was busy: the draft is in only after the turn closed. The turn waits for
    its transcript as usual, but the answer is asked on the draft meanwhile."""
    audio = np.concatenate([silence(0.4), tone(0.8), silence(2.5)])
    chat = fakes.FakeChat(reply="Sure, here you are.", ttft_s=0.25)
    transcriber = fakes.FakeTranscriber(
        ["Hello there."], delay_s=0.3, drafts=("hello there",), draft_delay_s=0.3
    )
    result, call = _call(preemptive=True, audio=audio, chat=chat, transcriber=transcriber)
    [turn] = result.turns
    assert [r[-1].content for r in chat.requests] == ["hello there"]
    assert turn.user_text == "Hello there." and call.preemptive_played == 1
    t = turn.timings
    # Draft in at ~430 ms, transcript at ~730 ms: the LLM's 250 ms were done by then.
    assert t.stt_ms == pytest.approx(410, abs=40) and t.v2v_ms is not None
    assert t.v2v_ms - (t.endpoint_ms + t.stt_ms) < 100, t


def test_a_draft_checked_before_the_close_plays_at_the_close() -> None:
    audio = np.concatenate([silence(0.4), tone(0.8), silence(2.5)])
    chat = fakes.FakeChat(reply="Sure, here you are.", ttft_s=0.25)
    transcriber = fakes.FakeTranscriber(["Hello there."], delay_s=0.1, drafts=("hello there",))
    result, call = _call(preemptive=True, audio=audio, chat=chat, transcriber=transcriber)
    [turn] = result.turns
    assert turn.user_text == "Hello there." and turn.timings.stt_ms == 0.0
    assert call.preemptive_played == 1 and call.wasted_llm_requests == 0
    assert len(chat.requests) == 1


def test_speech_after_the_pause_drops_the_preemptive_reply_and_answers_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # "I would like" ... 0.5 s ... "a table for two": the pause is shorter than the 640 ms
    # end silence, so the first pause is only a candidate.
    audio = np.concatenate([silence(0.3), tone(0.7), silence(0.5), tone(0.7), silence(3.0)])
    words = " ".join(f"word{i}" for i in range(40))
    chat = fakes.FakeChat(reply=f"First sentence here. {words}.", token_s=0.02)
    transcriber = fakes.FakeTranscriber(["I would like", "I would like a table for two"])
    synthesizer = fakes.ToneSynthesizer()
    metrics = Metrics()
    result, call = _call(
        preemptive=True,
        audio=audio,
        chat=chat,
        transcriber=transcriber,
        synthesizer=synthesizer,
        end_silence_ms=640,
        observer=metrics,
    )
    # The preemptive request answered the first words; it was closed mid-stream.
    assert len(chat.requests) == 2
    assert chat.requests[0][-1].content == "I would like"
    assert chat.requests[1][-1].content == "I would like a table for two"
    assert chat.sent_per_request[0] < 42, chat.sent_per_request  # closed before its end
    assert call.wasted_llm_requests == 1
    assert call.preemptive_played == 1  # the last pause's reply answered the turn
    assert 'voicebot_llm_requests_wasted_total{channel="simulate"} 1.0' in (
        metrics.render().decode()
    )
    # Its audio was synthesized but never played: nothing before the real speech end.
    rate, reply = result.reply_audio
    first_out = np.flatnonzero(np.abs(reply) > 0.01)[0] / rate
    assert first_out > 0.3 + 0.7 + 0.5 + 0.7 + 0.6
    # One turn, one user message for the whole utterance, no caption of the dropped reply.
    [turn] = result.turns
    assert turn.sequence == 1 and turn.user_text == "I would like a table for two"
    assert not turn.interrupted
    assert [u.turn.sequence for u in result.updates] == [1] * len(result.updates)
    assert all(u.turn.user_text == turn.user_text for u in result.updates)
    assert _states(result)[:5] == ONE_TURN
    # Nothing it said is logged.
    assert "I would like" not in caplog.text and "word1" not in caplog.text


def test_speech_after_the_close_drops_an_answer_waiting_for_its_check_at_once() -> None:
    """'I would like' ... 0.5 s (the turn closes at 320 ms) ... 'a table for two': the answer
    asked on the draft of the first part still waits for its check when the user goes on.
    It is dropped then, its LLM stream closed, not left streaming until the next pause."""
    audio = np.concatenate([silence(0.3), tone(0.7), silence(0.5), tone(0.7), silence(3.0)])
    words = " ".join(f"word{i}" for i in range(40))
    chat = fakes.FakeChat(reply=f"First sentence here. {words}.", token_s=0.02)
    transcriber = fakes.FakeTranscriber(
        ["I would like", "I would like a table for two"],
        delay_s=0.8,  # the first part's check is still running when the user goes on
        drafts=("i would like", "i would like a table for two"),
    )
    result, call = _call(preemptive=True, audio=audio, chat=chat, transcriber=transcriber)
    assert [r[-1].content for r in chat.requests] == [
        "i would like",
        "i would like a table for two",
    ]
    # Asked at ~1.14 s, first token 50 ms later, then 20 ms a token; the user went on at
    # 1.5 s: ~20 tokens sent, where a reply kept until the next pause streams all 43.
    assert chat.sent_per_request[0] < 30, chat.sent_per_request
    assert call.wasted_llm_requests == 1 and call.preemptive_played == 1
    [turn] = result.turns
    assert turn.sequence == 1 and turn.user_text == "I would like a table for two"
    assert turn.assistant_text == chat.reply and not turn.interrupted


def test_a_new_pause_replaces_the_preemptive_reply_and_off_means_off() -> None:
    # Two short pauses, each a candidate; the turn ends after the third stretch of speech.
    audio = np.concatenate(
        [tone(0.5), silence(0.45), tone(0.5), silence(0.45), tone(0.5), silence(2.5)]
    )
    for preemptive, requests, wasted in ((True, 3, 2), (False, 1, 0)):
        chat = fakes.FakeChat(reply="Okay then.", ttft_s=0.1)
        transcriber = fakes.FakeTranscriber(["one", "one two", "one two three"])
        result, call = _call(
            preemptive=preemptive,
            audio=audio,
            chat=chat,
            transcriber=transcriber,
            end_silence_ms=640,
        )
        [turn] = result.turns
        assert turn.user_text == "one two three"
        assert len(chat.requests) == requests
        assert call.wasted_llm_requests == wasted
        assert call.preemptive_played == int(preemptive)
        # The history the next request would see: one user message.
        assert [m.content for m in chat.requests[-1] if m.role == "user"] == ["one two three"]


class _CountingBook:
    """No database: every availability lookup is noted with its (virtual) time."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.lookups: list[float] = []

    def seats_taken(self, restaurant: str, day: date) -> dict[Any, int]:
        self.lookups.append(self.clock.now())
        return {}


@pytest.mark.parametrize("goes_on", [False, True])
def test_a_preemptive_reply_never_runs_a_tool_before_its_turn_is_confirmed(
    goes_on: bool,
) -> None:
    clock = VirtualClock()
    persona = fakes.persona(
        tools=("check_availability",),
        timezone="Asia/Tokyo",
        restaurant=RestaurantRules(name="preemptive-test"),
    )
    slot = {"date": "2026-12-04", "time": "19:00", "party_size": 2}
    script = ConversationScript(
        [
            Rule("We have a table.", after_tool="check_availability"),
            Rule(ScriptedReply("", (ScriptedToolCall("check_availability", slot),))),
        ]
    )
    # A long end silence (as Smart Turn's wait after an unfinished sentence): the model asks
    # for the tool long before the turn is confirmed.
    pieces = [silence(0.3), tone(0.8), silence(0.5)]
    if goes_on:
        pieces.append(tone(0.6))
    speech_end_s = sum(p.size for p in pieces) / 16000 - (0.5 if not goes_on else 0.0)
    audio = np.concatenate([*pieces, silence(5.0)])
    book = _CountingBook(clock)
    with OllamaProtocolServer("instant", script=script) as ollama:
        client = make_client(ollama.base_url, timeout_s=5.0)
        transcriber = fakes.FakeTranscriber(["a table", "a table for two"])
        synthesizer = fakes.ToneSynthesizer()
        for fake in (transcriber, synthesizer):
            fake.clock = clock
        stack = PersonaStack(persona, transcriber, OllamaChat(client, "fake"), synthesizer)
        runtime = Runtime(
            vad=fakes.EnergyVad(),
            stacks={persona.name: stack},
            turn_config=TurnConfig(end_silence_ms=1500),
            default_persona=persona.name,
            reservations=book,  # type: ignore[arg-type]
            wall_clock=lambda: datetime(2026, 11, 20, 9, 0, tzinfo=ZoneInfo("Asia/Tokyo")),
        )
        call = Call(runtime, channel="simulate", greet=False, clock=clock)
        start: list[float] = []
        result = simulate_call(
            runtime,
            (16000, audio),
            clock=clock,
            call=call,
            on_frame=lambda trace: start.append(trace.t0) if not start else None,
        )
        client.close()
    [turn] = result.turns
    assert [c.name for c in turn.tool_calls] == ["check_availability"]
    assert turn.assistant_text == "We have a table."
    # The tool ran once, for the confirmed turn, only once it was confirmed (1.5 s after
    # the speech end), although the preemptive reply asked for it ~0.2 s after it.
    [looked_up] = book.lookups
    assert looked_up - start[0] >= speech_end_s + 1.5 - 0.05
    # Nor was anything heard before then (the long wait for an unfinished sentence holds).
    rate, reply = result.reply_audio
    assert np.flatnonzero(np.abs(reply) > 0.01)[0] / rate >= speech_end_s + 1.5 - 0.05
    assert call.wasted_llm_requests == (1 if goes_on else 0)


def test_the_bench_reports_wasted_llm_requests_per_turn_apart_from_the_main_run() -> None:
    def m(pipeline: str, preemptive: str | None, v2v: float, wasted: int) -> Measurement:
        return Measurement(
            pipeline,  # type: ignore[arg-type]
            "en01",
            "en",
            0,
            endpoint_ms=300.0,
            v2v_ms=v2v,
            preemptive=preemptive,
            variant="" if preemptive in ("on", None) else f"preemptive {preemptive}",
            turns=0 if pipeline == "baseline" else 1,
            wasted_llm_requests=wasted,
            preemptive_played=int(preemptive == "on"),
            preemptive_head_start_ms=300.0 if preemptive == "on" else None,
        )

    rows = [
        m("ours", "on", 700.0, 1),
        m("ours", "off", 900.0, 0),
        m("baseline", None, 2000.0, 0),
        m("ours", "on", 800.0, 0),
        m("ours", "off", 1000.0, 0),
        m("baseline", None, 2100.0, 0),
    ]
    report = summarize(rows, machine={}, config={})
    ours = report.summary("ours", "en")
    assert ours is not None and ours.calls == 2  # the main run only
    assert ours.metrics["v2v_ms"].p50 == pytest.approx(750.0)
    on, off = report.preemption
    assert (on.preemptive, on.calls, on.wasted_llm_per_turn) == ("on", 2, 0.5)
    assert (off.preemptive, off.calls, off.wasted_llm_per_turn) == ("off", 2, 0.0)
    assert off.v2v.p50 == pytest.approx(950.0)
    table = format_table(report)
    assert "wasted LLM requests per turn 0.50  played preemptively 2/2 turns" in table
    assert "head start p50 300 ms" in table
    assert len(json.loads(report.to_json())["preemption"]) == 2


def test_bench_preemptive_option_takes_on_nodraft_off_or_several() -> None:
    assert _preemptive_list("on,off") == ("on", "off")
    assert _preemptive_list(" OFF ,NoDraft") == ("off", "nodraft")
    assert _preemptive_list("") == ()
    for bad in ("yes", "on,on", "on;off"):
        with pytest.raises(typer.BadParameter, match="expected some of on, nodraft, off"):
            _preemptive_list(bad)


def test_the_worker_posts_the_draft_first_and_skips_a_replaced_requests_full_pass() -> None:
    from voicebot.call.events import CallEvent, Transcribed
    from voicebot.call.transcription import TranscriptionWorker

    clock = VirtualClock()
    events: list[CallEvent] = []
    worker = TranscriptionWorker(clock, events.append)
    stt = fakes.FakeTranscriber(
        ["first full", "second full"],
        delay_s=0.3,
        drafts=("first draft", "second draft"),
        draft_delay_s=0.1,
    )
    stt.clock = clock
    audio = np.zeros(16000, np.float32)

    ids: list[int] = []

    def caller() -> None:
        ids.append(worker.request(audio, stt, "en", draft=True))
        clock.sleep(0.05)  # while the first request's draft is being made
        ids.append(worker.request(audio, stt, "en", draft=True))
        clock.sleep(1.0)
        worker.close()

    clock.start_thread(caller, "caller")
    clock.advance(2.0)
    assert ids == [1, 2]
    posted = [(e.request, e.text, e.draft) for e in events if isinstance(e, Transcribed)]
    # The first request's full pass never ran: the second one had replaced it by then.
    assert posted == [(1, "first draft", True), (2, "second draft", True), (2, "first full", False)]
    assert len(stt.calls) == 1 and worker.replaced == 1


def test_a_failing_draft_costs_nothing_but_its_time() -> None:
    """The draft pass raises: no draft, no LLM request on it; the turn is answered on the
    transcript as without drafts."""
    audio = np.concatenate([silence(0.4), tone(0.8), silence(2.5)])
    chat = fakes.FakeChat(reply="Sure, here you are.", ttft_s=0.25)
    transcriber = fakes.FakeTranscriber(["Hello there."], delay_s=0.3, drafts=("hello",))
    transcriber.fail_drafts = True
    result, call = _call(preemptive=True, audio=audio, chat=chat, transcriber=transcriber)
    [turn] = result.turns
    assert turn.user_text == "Hello there." and turn.assistant_text == chat.reply
    assert [r[-1].content for r in chat.requests] == ["Hello there."]
    assert transcriber.drafts_given == 1 and call.wasted_llm_requests == 0
