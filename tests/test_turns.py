"""The turn-taking state machine on the sample clock, with a loudness VAD."""

from __future__ import annotations

import numpy as np

from tests.fakes import EnergyVadStream, silence, tone
from voicebot.turns import (
    BargeIn,
    EndCandidate,
    SpeechStarted,
    TurnConfig,
    TurnDetector,
    UserTurn,
)

RATE = 16000


def run(config: TurnConfig, audio: np.ndarray, agent_speaking: bool = False) -> list[object]:
    detector = TurnDetector(config, EnergyVadStream())
    events: list[object] = []
    for start in range(0, audio.size, 320):  # 20 ms frames, as a call delivers them
        events += detector.push(audio[start : start + 320], agent_speaking=agent_speaking)
    return events


def test_turn_ends_after_configured_silence_with_pre_roll() -> None:
    config = TurnConfig(end_silence_ms=288, pre_roll_ms=320)
    audio = np.concatenate([silence(1.0), tone(1.0), silence(1.0)])
    events = run(config, audio)
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStarted, EndCandidate, UserTurn]
    turn = events[-1]
    assert isinstance(turn, UserTurn)
    speech_end = turn.speech_end_sample / RATE
    assert 1.99 <= speech_end <= 2.04
    # closed one silence period after the last voiced window, to the window
    assert abs((turn.closed_sample - turn.speech_end_sample) / RATE - 0.288) < 0.033
    # pre-roll: the turn's audio begins before the speech does
    assert turn.audio.size / RATE >= 1.0 + 0.3
    assert not turn.truncated


def test_silence_and_faint_noise_forever_make_no_turn() -> None:
    rng = np.random.default_rng(0)
    noise = (0.01 * rng.standard_normal(RATE * 20)).astype(np.float32)
    assert run(TurnConfig(), noise) == []


def test_blip_shorter_than_min_speech_is_ignored() -> None:
    audio = np.concatenate([silence(0.5), tone(0.02), silence(1.0)])
    assert run(TurnConfig(min_speech_ms=96), audio) == []


def test_pause_shorter_than_end_silence_keeps_one_turn() -> None:
    audio = np.concatenate([tone(0.6), silence(0.2), tone(0.6), silence(0.6)])
    turns = [e for e in run(TurnConfig(end_silence_ms=288), audio) if isinstance(e, UserTurn)]
    assert len(turns) == 1
    assert turns[0].audio.size / RATE > 1.3


def test_maximum_utterance_length_cuts_the_turn() -> None:
    audio = np.concatenate([tone(3.0), silence(0.5)])
    turns = [e for e in run(TurnConfig(max_utterance_s=1.0), audio) if isinstance(e, UserTurn)]
    assert turns[0].truncated
    assert abs(turns[0].audio.size / RATE - 1.0) < 0.1


def test_barge_in_reported_after_sustained_speech_while_agent_talks() -> None:
    config = TurnConfig(bargein_min_speech_ms=160)
    audio = np.concatenate([silence(0.5), tone(1.0), silence(0.5)])
    events = run(config, audio, agent_speaking=True)
    barge = [e for e in events if isinstance(e, BargeIn)]
    assert len(barge) == 1
    assert not any(isinstance(e, SpeechStarted) for e in events)
    delay = (barge[0].detected_sample - barge[0].start_sample) / RATE
    assert 0.15 <= delay <= 0.2
    assert any(isinstance(e, UserTurn) for e in events)  # the interruption is still a turn
