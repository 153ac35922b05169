"""The defects of the first call handler (issue 9), each through the FastRTC handler in real
time, as a call runs. Each of these failed on the handler before the call core."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from tests import fakes
from tests.fakes import silence, tone
from voicebot.audio import MonoAudio
from voicebot.call.clock import VirtualClock
from voicebot.handler import VoiceHandler
from voicebot.simulate import CallTrace, simulate_call
from voicebot.store import InMemoryTurnStore

LONG_REPLY = " ".join(f"Sentence number {i} is here." for i in range(1, 30))
GOODBYE = "Time is up, goodbye."


class _LoudnessByLine(fakes.ToneSynthesizer):
    """The goodbye is quieter than everything else, so the two can be told apart by ear."""

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        for rate, samples in super().synthesize(text):
            yield rate, samples * (0.3 if text == GOODBYE else 1.0)


def _loudness(audio: MonoAudio) -> np.ndarray:
    rate, samples = audio
    frame = rate // 50
    usable = samples[: samples.size // frame * frame].reshape(-1, frame)
    return np.max(np.abs(usable), axis=1)


def test_time_limit_mid_reply_records_the_reply_then_says_goodbye_then_closes() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.0)
    rt = fakes.runtime(chat=chat, synthesizer=_LoudnessByLine())
    handler = VoiceHandler(rt, channel="simulate", greet=False)
    audio = np.concatenate([tone(0.6), silence(8.0)])
    # the reply starts about 1 s in; the time limit strikes 1.5 s into it
    timer = threading.Timer(2.5, handler.end_call, [GOODBYE])
    timer.start()
    try:
        result = simulate_call(rt, (16000, audio), handler=handler, max_tail_s=10.0)
    finally:
        timer.cancel()
    [turn] = result.turns
    assert turn.interrupted
    assert 0 < len(turn.assistant_text) < len(LONG_REPLY) / 2
    loud = _loudness(result.reply_audio)
    reply_frames = np.flatnonzero(loud > 0.2)
    goodbye_frames = np.flatnonzero((loud > 0.02) & (loud < 0.15))
    assert reply_frames.size and goodbye_frames.size > 20  # the goodbye was said in full
    assert reply_frames[-1] < goodbye_frames[0]  # after the reply, never over it
    assert result.duration_s < 7.0  # and the call closed after it, before the audio ran out


def test_two_short_overlaps_in_a_row_make_one_turn_and_no_orphan_reply() -> None:
    chat = fakes.FakeChat(reply=LONG_REPLY, token_s=0.0, later_replies=["Okay."])
    # judging an overlap takes longer than the gap before the next one
    stt = fakes.FakeTranscriber(["tell me", "no", "no, wait, stop"], delay_s=1.0)
    rt = fakes.runtime(chat=chat, transcriber=stt)
    handler = VoiceHandler(rt, channel="simulate", greet=False)
    # the reply plays from about 2 s; two 0.3 s utterances over it, 0.45 s apart
    audio = np.concatenate(
        [tone(0.6), silence(2.6), tone(0.3), silence(0.45), tone(0.3), silence(5.0)]
    )
    result = simulate_call(rt, (16000, audio), handler=handler)
    assert [t.sequence for t in result.turns] == [1, 2]
    assert result.turns[0].interrupted
    assert result.turns[1].user_text == "no, wait, stop"
    assert not result.turns[1].interrupted
    assert len(chat.requests) == 2  # every reply the LLM wrote was recorded as a turn


def test_many_short_pauses_in_one_utterance_keep_one_transcription_in_flight() -> None:
    stt = fakes.FakeTranscriber(["a long sentence with many pauses"], delay_s=0.5)
    rt = fakes.runtime(transcriber=stt)
    handler = VoiceHandler(rt, channel="simulate", greet=False)
    # fourteen 150 ms pauses: each one long enough for an early transcription
    pieces = [part for _ in range(14) for part in (tone(0.3), silence(0.15))]
    audio = np.concatenate([*pieces, silence(2.5)])
    baseline = threading.active_count()
    peak = [baseline]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threading.active_count())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = simulate_call(rt, (16000, audio), handler=handler)
    finally:
        done.set()
        watcher.join()
    assert len(result.turns) == 1
    assert stt.max_in_flight == 1
    assert len(stt.calls) <= 14
    # the simulator's two threads, the watcher, the policy, stt, a reply's llm and tts
    assert peak[0] - baseline <= 7


def test_shutdown_mid_reply_records_the_turn_and_ends_the_conversation() -> None:
    """What a server stop (SIGTERM) does to each call: the handler's ``shutdown``. (This one
    already held before the call core; the server's side is tested with ``voicebot serve``.)"""
    store = InMemoryTurnStore()
    clock = VirtualClock()
    rt = fakes.runtime(clock=clock, chat=fakes.FakeChat(reply=LONG_REPLY, token_s=0.0), store=store)
    handler = VoiceHandler(rt, channel="simulate", greet=False, clock=clock)

    def stop_mid_reply(trace: CallTrace) -> None:
        if len(trace.played) == 50:  # a second of the reply was handed out
            handler.shutdown()

    audio = np.concatenate([tone(0.6), silence(5.0)])
    simulate_call(rt, (16000, audio), clock=clock, call=handler.call, on_frame=stop_mid_reply)
    handler.shutdown()  # again: nothing more happens
    [turn] = store.turns
    assert turn.interrupted and 0 < len(turn.assistant_text) < len(LONG_REPLY)
    assert list(store.ended) == [handler.conversation_id]
