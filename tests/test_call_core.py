"""The call core on a virtual clock: playout pacing, the policy's states, the page contract
(C1) and the call's end. No sleeps: time moves only when the test advances it."""

from __future__ import annotations

import itertools
import logging
import threading

import numpy as np
import pytest

from tests import fakes
from tests.fakes import silence, tone
from voicebot.call.clock import VirtualClock
from voicebot.call.events import CallEvent, ChunkPlaying, PlayoutDrained
from voicebot.call.playout import FRAME_S, FRAME_SAMPLES, ChunkHeard, Playout, played_text
from voicebot.call.session import Call
from voicebot.call.status import CallStatus
from voicebot.simulate import CallTrace, simulate_call
from voicebot.store import InMemoryTurnStore

LONG_REPLY = " ".join(f"Sentence number {i} is here." for i in range(1, 30))


# --- playout -----------------------------------------------------------------------------------


def _playout() -> tuple[Playout, list[CallEvent]]:
    reports: list[CallEvent] = []
    return Playout(threading.Condition(threading.Lock()), reports.append), reports


def _take(playout: Playout, now: float) -> tuple[np.ndarray | None, float | None]:
    with playout._lock:
        return playout.take_locked(now)


def test_playout_hands_frames_out_60_ms_ahead_then_at_playback_pace() -> None:
    playout, reports = _playout()
    assert playout.push(1, 0, np.ones(FRAME_SAMPLES * 10, np.float32))
    t0 = 100.0
    # the first frame starts the clock; three more are due at once (the 60 ms lead)
    taken = [_take(playout, t0)[0] is not None for _ in range(5)]
    assert taken == [True, True, True, True, False]
    frame, due_in = _take(playout, t0)
    assert frame is None and due_in == pytest.approx(FRAME_S)
    assert _take(playout, t0 + FRAME_S)[0] is not None
    assert reports == [ChunkPlaying(1, 0, t0)]
    assert playout.heard(1) == [ChunkHeard(pushed=FRAME_SAMPLES * 10, played=FRAME_SAMPLES * 5)]


def test_playout_pause_resume_clear_and_drain_reports() -> None:
    playout, reports = _playout()
    playout.push(1, 0, np.ones(FRAME_SAMPLES * 2, np.float32))
    playout.end_chunk(1, 0)
    assert playout.pause() is None  # nothing handed out yet
    assert _take(playout, 0.0) == (None, None)
    playout.resume()
    assert _take(playout, 0.0)[0] is not None
    assert playout.pause() == 0.0  # when the last frame went out
    playout.resume()
    assert _take(playout, 0.0)[0] is not None
    assert reports[-1] == PlayoutDrained(1, 0.0)
    playout.push(2, 0, np.ones(FRAME_SAMPLES * 3, np.float32))
    playout.clear(2)
    assert playout.queued() == 0
    assert not playout.push(2, 1, np.ones(FRAME_SAMPLES, np.float32))  # refused once cleared
    assert playout.push(3, 0, np.ones(FRAME_SAMPLES, np.float32))


def test_a_long_gap_restarts_the_playback_clock() -> None:
    playout, _ = _playout()
    playout.push(1, 0, np.ones(FRAME_SAMPLES * 8, np.float32))
    for _ in range(4):
        assert _take(playout, 0.0)[0] is not None
    # one second later, not a burst of the "overdue" frames: a fresh 60 ms lead
    taken = [_take(playout, 1.0)[0] is not None for _ in range(5)]
    assert taken == [True, True, True, True, False]


def test_played_text_keeps_whole_chunks_then_a_cut_word_prefix() -> None:
    texts = ["One two three.", "Four five six seven."]
    whole = ChunkHeard(100, 100, True)
    cut = played_text(texts, [whole, ChunkHeard(100, 60, True)], " ")
    assert cut == "One two three. Four five…"
    assert played_text(texts, [whole, ChunkHeard(100, 0, True)], " ") == "One two three."
    # synthesis still running: be conservative (half)
    assert played_text(texts, [ChunkHeard(100, 100, False)], " ") == "One…"
    assert played_text(["あいうえお"], [ChunkHeard(10, 4, True)], "") == "あい…"


# --- the virtual clock -------------------------------------------------------------------------


def test_virtual_clock_runs_threads_in_virtual_time_only() -> None:
    clock = VirtualClock(start=0.0)
    woke: list[float] = []
    clock.start_thread(lambda: (clock.sleep(0.5), woke.append(clock.now())), "sleeper")
    clock.advance(0.4)
    assert woke == []
    clock.advance(0.2)
    assert woke == [0.5]
    assert clock.now() == pytest.approx(0.6)


def test_virtual_clock_names_a_thread_blocked_outside_it() -> None:
    clock = VirtualClock(settle_timeout_s=0.2)
    gate = threading.Event()
    clock.start_thread(gate.wait, "stuck")
    with pytest.raises(RuntimeError, match="blocked outside the clock"):
        clock.advance(0.1)
    gate.set()


# --- the policy, through a whole call on the virtual clock -------------------------------------


def _states(outputs: list[object]) -> list[str]:
    return [o.state for o in outputs if isinstance(o, CallStatus)]


def test_states_follow_the_turn_and_the_greeting_is_turn_zero() -> None:
    clock = VirtualClock()
    chat = fakes.FakeChat()
    store = InMemoryTurnStore()
    rt = fakes.runtime(clock=clock, chat=chat, store=store)
    audio = np.concatenate([silence(2.5), tone(0.6), silence(3.0)])
    result = simulate_call(rt, (16000, audio), clock=clock, greet=True)
    states = _states(result.outputs)
    assert states[:3] == ["listening", "thinking", "speaking"]  # the greeting
    expected = ["listening", "user_speaking", "thinking", "speaking", "listening"]
    assert states[3 : 3 + len(expected)] == expected
    assert states[-1] == "closing"  # hung up at the end of the simulation
    greeting = [u for u in result.updates if u.turn.sequence == 0]
    assert greeting[-1].final and greeting[-1].turn.assistant_text == "Hello, how can I help?"
    assert greeting[-1].turn.user_text == ""
    assert [t.sequence for t in store.turns] == [1]  # the greeting is not stored


def test_captions_grow_chunk_by_chunk_then_the_final_update() -> None:
    clock = VirtualClock()
    chat = fakes.FakeChat()  # three sentences: three chunks
    rt = fakes.runtime(clock=clock, chat=chat)
    result = simulate_call(rt, (16000, np.concatenate([tone(0.6), silence(4.0)])), clock=clock)
    captions = [u.turn.assistant_text for u in result.updates if not u.final]
    assert len(captions) >= 2
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(captions))
    assert captions[-1] == chat.reply
    assert [u.final for u in result.updates][-1]
    assert result.updates[-1].turn.assistant_text == chat.reply


def test_a_failing_llm_shows_an_error_status_with_its_cause() -> None:
    clock = VirtualClock()
    chat = fakes.FakeChat()
    chat.fail_after = 0
    rt = fakes.runtime(clock=clock, chat=chat)
    result = simulate_call(rt, (16000, np.concatenate([tone(0.6), silence(3.0)])), clock=clock)
    errors = [o for o in result.outputs if isinstance(o, CallStatus) and o.state == "error"]
    assert len(errors) == 1 and errors[0].detail is not None
    assert "unreachable" in errors[0].detail
    states = _states(result.outputs)
    assert states[states.index("error") + 1] != "error"  # the next state replaces it


def test_shutdown_records_the_turn_in_flight_and_ends_the_conversation_once() -> None:
    clock = VirtualClock()
    store = InMemoryTurnStore()
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.0)
    rt = fakes.runtime(clock=clock, chat=chat, store=store)
    call = Call(rt, channel="simulate", greet=False, clock=clock)
    ends: list[int] = []
    call.on_end = lambda: ends.append(1)

    def hang_up_mid_reply(trace: CallTrace) -> None:
        if len(trace.played) == 50:  # a second of the reply was handed out
            call.shutdown()
            call.shutdown()

    audio = np.concatenate([tone(0.6), silence(5.0)])
    simulate_call(rt, (16000, audio), clock=clock, call=call, on_frame=hang_up_mid_reply)
    call.shutdown()
    assert ends == [1]
    [turn] = store.turns
    assert turn.interrupted and turn.ended_at is not None
    assert 0 < len(turn.assistant_text) < len(LONG_REPLY)
    assert LONG_REPLY.startswith(turn.assistant_text.rstrip("…").rsplit(" ", 1)[0])
    assert call.conversation_id in store.ended


def test_no_log_line_holds_what_was_said(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    reply = "One two three four five six seven. Eight nine ten eleven twelve."
    stt = fakes.FakeTranscriber(["tell me a secret", "Uh-huh.", "my pin is 4321"])
    chat = fakes.FakeChat(reply=reply, later_replies=["Your secret is safe."])
    rt = fakes.runtime(clock=clock, chat=chat, transcriber=stt)
    audio = np.concatenate(
        [tone(0.6), silence(1.2), tone(0.3), silence(3.0), tone(0.6), silence(3.0)]
    )
    with caplog.at_level(logging.DEBUG):
        result = simulate_call(rt, (16000, audio), clock=clock, greet=True)
    assert len(result.turns) >= 2
    said = ["tell me", "Uh-huh", "4321", "secret", "One two", "Eight nine", "help?"]
    for record in caplog.records:
        message = record.getMessage()
        assert not any(s in message for s in said), message


def test_the_call_resamples_its_input_as_one_stream() -> None:
    """22.05 kHz frames (piper's rate, what the tests speak) reach the turn detector as the
    whole input resampled at once, not as 20 ms pieces resampled apart (a step at each
    frame edge)."""
    from voicebot.audio import StreamResampler, resample

    clock = VirtualClock()
    stt = fakes.FakeTranscriber()
    rt = fakes.runtime(clock=clock, transcriber=stt)
    rate = 22050
    audio = np.concatenate([silence(0.4, rate), tone(0.8, rate), silence(1.5, rate)])
    simulate_call(rt, (rate, audio), clock=clock)
    heard = stt.heard[-1]
    lag = np.zeros(StreamResampler(rate, 16000).lag, np.float32)
    whole = resample(np.concatenate((lag, audio)), rate, 16000)
    # Where the clip sits in the whole: the offset that matches 256 samples of its tone.
    voiced = int(np.flatnonzero(np.abs(heard) > 0.05)[0])
    windows = np.lib.stride_tricks.sliding_window_view(whole, 256)
    at = int(np.argmin(np.sum((windows - heard[voiced : voiced + 256]) ** 2, axis=1)))
    start = at - voiced
    np.testing.assert_allclose(heard, whole[start : start + heard.size], atol=1e-5)
