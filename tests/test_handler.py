"""The call handler end to end through the simulate harness, with fakes at every seam."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests import fakes
from tests.fakes import silence, tone
from voicebot.call.clock import VirtualClock
from voicebot.call.events import AudioOut
from voicebot.call.session import Call
from voicebot.runtime import Runtime
from voicebot.simulate import simulate_call

LONG_REPLY = " ".join(f"Sentence number {i} is here." for i in range(1, 30))


def virtual(**kwargs: object) -> tuple[Runtime, VirtualClock]:
    """A runtime of fakes on a virtual clock: the call runs as fast as the CPU allows."""
    clock = VirtualClock()
    return fakes.runtime(clock=clock, **kwargs), clock  # type: ignore[arg-type]


def test_one_turn_is_answered_with_timings_and_bounded_history() -> None:
    chat = fakes.FakeChat()
    rt, clock = virtual(chat=chat, synthesizer=fakes.ToneSynthesizer(per_char_s=0.01))
    audio = np.concatenate([silence(0.4), tone(0.8), silence(2.0), tone(0.8), silence(1.5)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert [t.sequence for t in result.turns] == [1, 2]
    first = result.turns[0]
    assert first.user_text == "hello there"
    assert first.assistant_text == chat.reply
    assert not first.interrupted
    t = first.timings
    for value in (t.endpoint_ms, t.stt_ms, t.llm_ttft_ms, t.tts_first_ms, t.v2v_ms):
        assert value is not None and value >= 0
    assert t.bargein_stop_ms is None
    assert t.v2v_ms is not None and t.endpoint_ms is not None and t.v2v_ms >= t.endpoint_ms
    # the second request carries the first exchange, system prompt first
    second = chat.requests[1]
    assert second[0].role == "system"
    assert [m.role for m in second[1:]] == ["user", "assistant", "user"]
    # reply audio is on the timeline after the first utterance ended
    rate, reply = result.reply_audio
    first_out = np.flatnonzero(np.abs(reply) > 0.01)[0] / rate
    assert first_out > 1.2
    updates = [u for u in result.updates if u.final]
    assert [u.turn.sequence for u in updates] == [1, 2]


def test_barge_in_stops_audio_cancels_llm_and_keeps_only_what_was_played() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.03, later_replies=["Okay."])
    rt, clock = virtual(chat=chat, transcriber=fakes.FakeTranscriber(["tell me", "stop please"]))
    # speak, let the agent talk ~1.5 s, then interrupt
    audio = np.concatenate([tone(0.8), silence(2.0), tone(0.8), silence(1.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    first = result.turns[0]
    assert first.interrupted
    assert first.timings.bargein_stop_ms is not None
    assert first.timings.bargein_stop_ms < 400
    assert 0 < len(first.assistant_text) < len(LONG_REPLY) / 2
    assert LONG_REPLY.startswith(first.assistant_text.rstrip("…").rsplit(" ", 1)[0])
    # generation was cancelled: the first request never streamed the whole reply
    assert chat.sent_per_request[0] < len(LONG_REPLY.split(" "))
    # the interruption itself became the next turn, and its history marks the cut
    assert result.turns[1].user_text == "stop please"
    assert "interrupted" in chat.requests[1][2].content


def test_agent_audio_stops_within_frames_of_barge_in() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.0, later_replies=["Okay."])
    rt, clock = virtual(chat=chat)
    audio = np.concatenate([tone(0.8), silence(2.0), tone(1.5), silence(1.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    rate, reply = result.reply_audio
    interrupt_at = 0.8 + 2.0
    after = reply[int((interrupt_at + 0.35) * rate) : int((interrupt_at + 1.5) * rate)]
    assert np.max(np.abs(after)) < 0.01  # silent while the user talks over it


def test_llm_failure_speaks_apology_and_next_turn_works() -> None:
    chat = fakes.FakeChat()
    chat.fail_after = 0
    synth = fakes.ToneSynthesizer()
    rt, clock = virtual(chat=chat, synthesizer=synth)
    audio = np.concatenate([tone(0.6), silence(2.0)])
    call = Call(rt, channel="simulate", greet=False, clock=clock)
    result = simulate_call(rt, (16000, audio), clock=clock, call=call)
    assert result.turns[0].error is not None and "llm" in result.turns[0].error
    assert result.turns[0].assistant_text == "Sorry, something went wrong."
    chat.fail_after = None
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert result.turns[0].error is None
    assert result.turns[0].assistant_text == chat.reply


def test_empty_transcript_gives_no_reply() -> None:
    chat = fakes.FakeChat()
    rt, clock = virtual(chat=chat, transcriber=fakes.FakeTranscriber([""]))
    result = simulate_call(rt, (16000, np.concatenate([tone(0.6), silence(1.5)])), clock=clock)
    assert result.turns == []
    assert chat.requests == []


def test_noise_forever_does_no_work() -> None:
    stt = fakes.FakeTranscriber()
    rt, clock = virtual(transcriber=stt)
    rng = np.random.default_rng(1)
    noise = (0.01 * rng.standard_normal(16000 * 4)).astype(np.float32)
    result = simulate_call(rt, (16000, noise), clock=clock)
    assert result.turns == [] and stt.calls == []


@pytest.mark.parametrize(
    ("rate", "stereo", "dtype"),
    [
        (8000, False, "int16"),
        (24000, False, "float32"),
        (44100, True, "float32"),
        (48000, True, "int16"),
    ],
)
def test_any_rate_layout_and_dtype_is_accepted(rate: int, stereo: bool, dtype: str) -> None:
    stt = fakes.FakeTranscriber()
    rt, clock = virtual(transcriber=stt)
    audio = np.concatenate([tone(0.7, rate), silence(1.0, rate)])
    if dtype == "int16":
        audio = (audio * 32767).astype(np.int16)
    else:
        audio[100], audio[200], audio[300] = np.nan, np.inf, 7.0  # sanitized, not fatal
    if stereo:
        audio = np.stack([audio, audio], axis=1)
    result = simulate_call(rt, (rate, audio), clock=clock)
    assert len(result.turns) == 1
    assert abs(stt.calls[0] - 0.7) < 0.45  # the utterance plus pre-roll, at 16 kHz


def test_greeting_is_spoken_and_joins_history() -> None:
    synth = fakes.ToneSynthesizer()
    chat = fakes.FakeChat()
    rt, clock = virtual(synthesizer=synth, chat=chat)
    audio = np.concatenate([silence(3.5), tone(0.6), silence(1.5)])
    simulate_call(rt, (16000, audio), clock=clock, greet=True)
    assert synth.texts[0] == "Hello, how can I help?"
    assert [m.role for m in chat.requests[0]] == ["system", "assistant", "user"]


def test_hang_up_mid_reply_stops_generation_at_once() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.05)
    rt = fakes.runtime(chat=chat)  # on real time: the hang-up comes from another thread
    call = Call(rt, channel="simulate", greet=False)
    call.start()
    for frame in np.split(np.concatenate([tone(0.6), silence(0.6)]), 60):
        call.receive((16000, frame))
    deadline = time.monotonic() + 5
    while chat.tokens_sent < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    call.shutdown()
    assert chat.closed.wait(1.0)
    sent = chat.tokens_sent
    time.sleep(0.3)
    assert chat.tokens_sent == sent < len(LONG_REPLY.split(" "))
    after = [call.next_output(0.01) for _ in range(5)]
    assert not any(isinstance(item, AudioOut) for item in after)  # no more agent audio
    [turn] = call.completed_turns  # recorded, as interrupted
    assert turn.interrupted and turn.user_text == "hello there"


def test_backchannel_pauses_then_resumes_the_agent() -> None:
    reply = "One two three four five six seven. Eight nine ten eleven twelve."
    chat = fakes.FakeChat(reply=reply)
    stt = fakes.FakeTranscriber(["tell me a story", "Uh-huh."])
    rt, clock = virtual(chat=chat, transcriber=stt)
    # the agent talks ~1.9 s from about 1.2 s; "uh-huh" at 1.8 s
    audio = np.concatenate([tone(0.6), silence(1.2), tone(0.3), silence(3.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert len(result.turns) == 1
    assert not result.turns[0].interrupted
    assert result.turns[0].assistant_text == reply
    assert result.turns[0].timings.bargein_stop_ms is None
    assert len(chat.requests) == 1


def test_talking_over_the_agent_longer_than_a_backchannel_stops_it_before_the_end() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.0, later_replies=["Okay."])
    stt = fakes.FakeTranscriber(["tell me", "uh-huh"])  # even words that look like one
    rt, clock = virtual(chat=chat, transcriber=stt)
    audio = np.concatenate([tone(0.6), silence(2.0), tone(2.5), silence(1.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert result.turns[0].interrupted
    assert len(result.turns) == 2


def test_malformed_frames_are_dropped_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stt = fakes.FakeTranscriber()
    rt, clock = virtual(transcriber=stt)
    call = Call(rt, channel="simulate", greet=False, clock=clock)
    call.start()
    with caplog.at_level("WARNING"):
        call.receive((0, np.zeros(320, np.float32)))  # no sample rate
        call.receive((16000, np.zeros((2, 2, 2), np.float32)))  # three axes
        call.receive((16000, np.zeros((2, 2, 2), np.float32)))
    assert len([r for r in caplog.records if "dropping" in r.getMessage()]) == 1  # logged once
    audio = np.concatenate([tone(0.6), silence(1.0)])
    result = simulate_call(rt, (16000, audio), clock=clock, call=call)
    assert len(result.turns) == 1


def test_speech_resuming_before_the_answer_merges_into_one_turn() -> None:
    stt = fakes.FakeTranscriber(["first half", "first half and the rest"])
    chat = fakes.FakeChat(ttft_s=1.0)
    rt, clock = virtual(transcriber=stt, chat=chat)
    audio = np.concatenate([tone(0.6), silence(0.6), tone(0.6), silence(3.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert [(t.sequence, t.user_text) for t in result.turns] == [(1, "first half and the rest")]
    assert stt.calls[-1] > 1.6  # both utterances, transcribed together
    assert {u.turn.sequence for u in result.updates if not u.final} == {1}  # no orphan bubble


def test_stt_failure_apologizes_and_the_turn_records_the_error() -> None:
    stt = fakes.FakeTranscriber()
    stt.fail = True
    rt, clock = virtual(transcriber=stt)
    result = simulate_call(rt, (16000, np.concatenate([tone(0.6), silence(1.5)])), clock=clock)
    assert len(result.turns) == 1
    turn = result.turns[0]
    assert turn.sequence == 1 and turn.error is not None and "stt" in turn.error
    assert turn.assistant_text == "Sorry, something went wrong."


class _SlowSecondChunk(fakes.ToneSynthesizer):
    """The second chunk's audio comes late, as TTS does on a loaded machine."""

    def synthesize(self, text: str):  # type: ignore[no-untyped-def]
        if len(self.texts) == 1:
            self.pause(1.5)
        yield from super().synthesize(text)


def test_speech_between_two_chunks_still_interrupts_the_agent() -> None:
    chat = fakes.FakeChat(reply="Short one. " + LONG_REPLY, later_replies=["Okay."])
    synth = _SlowSecondChunk(per_char_s=0.03)
    rt, clock = virtual(chat=chat, synthesizer=synth)
    # "Short one." plays ~0.3 s from about 1.0 s; the user speaks at 1.6 s, in the gap
    audio = np.concatenate([tone(0.6), silence(1.0), tone(1.4), silence(3.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    first = result.turns[0]
    assert first.interrupted
    assert first.assistant_text == "Short one."
    rate, reply = result.reply_audio
    during = reply[int(1.9 * rate) : int(3.0 * rate)]
    assert np.max(np.abs(during)) < 0.01  # the late chunk never played over the user


def test_an_interruption_with_a_pause_in_it_is_one_turn() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.0, later_replies=["Okay."])
    # the judgement of "Wait," takes longer than the user's pause after it
    stt = fakes.FakeTranscriber(["tell me", "Wait.", "Wait, let me stop you there."], delay_s=0.6)
    rt, clock = virtual(chat=chat, transcriber=stt)
    audio = np.concatenate(
        [tone(0.6), silence(2.2), tone(0.4), silence(0.45), tone(1.0), silence(2.5)]
    )
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert [t.user_text for t in result.turns] == ["tell me", "Wait, let me stop you there."]
    assert result.turns[0].interrupted
    assert stt.calls[-1] > 1.8  # "Wait," and the rest, transcribed together
