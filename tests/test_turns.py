"""The turn-taking state machine on the sample clock, with a loudness VAD."""

from __future__ import annotations

import time

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


# --- with a turn-end model


class ScriptedTurnEnd:
    """A TurnEndModel that answers from a list (one answer per pause) and records the audio."""

    def __init__(self, answers: list[float | Exception]) -> None:
        self.answers = list(answers)
        self.asked: list[int] = []

    def complete_probability(self, audio: np.ndarray) -> float:
        self.asked.append(audio.size)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


MODEL_CONFIG = TurnConfig(
    end_silence_ms=320, turn_end_ask_ms=96, complete_silence_ms=192, incomplete_silence_ms=1200
)


def run_with(
    model: ScriptedTurnEnd,
    audio: np.ndarray,
    config: TurnConfig = MODEL_CONFIG,
    executor=None,
    real_time: bool = False,
) -> list[UserTurn]:
    import time

    detector = TurnDetector(config, EnergyVadStream(), turn_end=model, executor=executor)
    events: list[object] = []
    for start in range(0, audio.size, 320):
        events += detector.push(audio[start : start + 320])
        if real_time:
            time.sleep(0.02)  # 20 ms frames at the pace a call delivers them
    return [e for e in events if isinstance(e, UserTurn)]


def _endpoint_ms(turn: UserTurn) -> float:
    return 1000 * (turn.closed_sample - turn.speech_end_sample) / RATE


def test_complete_turn_ends_after_the_short_silence() -> None:
    model = ScriptedTurnEnd([0.9])
    turns = run_with(model, np.concatenate([silence(0.5), tone(1.0), silence(1.0)]))
    assert len(turns) == 1 and len(model.asked) == 1
    assert abs(_endpoint_ms(turns[0]) - 192) <= 32
    assert turns[0].complete_probability == 0.9


def test_unfinished_turn_waits_through_a_pause() -> None:
    # "I'd like a table for… (0.9 s) …four": the model hears the first part as unfinished.
    model = ScriptedTurnEnd([0.1, 0.95])
    audio = np.concatenate([silence(0.5), tone(1.0), silence(0.9), tone(0.6), silence(1.0)])
    turns = run_with(model, audio)
    assert len(turns) == 1, "cut in during the pause"
    assert turns[0].audio.size / RATE > 2.4  # both parts in one turn
    assert abs(_endpoint_ms(turns[0]) - 192) <= 32  # the second pause sounded complete
    assert len(model.asked) == 2


def test_unfinished_turn_still_ends_after_the_long_silence() -> None:
    model = ScriptedTurnEnd([0.2])
    turns = run_with(model, np.concatenate([silence(0.5), tone(1.0), silence(2.0)]))
    assert len(turns) == 1
    assert abs(_endpoint_ms(turns[0]) - 1200) <= 32
    assert turns[0].complete_probability == 0.2


def test_model_failure_falls_back_to_silence_timing(caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="voicebot.turns")
    model = ScriptedTurnEnd([RuntimeError("onnx exploded")])
    turns = run_with(model, np.concatenate([silence(0.5), tone(1.0), silence(1.0)]))
    assert len(turns) == 1
    assert abs(_endpoint_ms(turns[0]) - 320) <= 32
    assert turns[0].complete_probability is None
    failures = [r for r in caplog.records if "turn-end model failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_slow_model_falls_back_to_silence_timing(caplog) -> None:
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()

    class Stuck(ScriptedTurnEnd):
        def complete_probability(self, audio: np.ndarray) -> float:
            release.wait(5)
            return 0.9

    caplog.set_level(logging.INFO, logger="voicebot.turns")
    config = TurnConfig(
        end_silence_ms=320,
        turn_end_ask_ms=96,
        complete_silence_ms=192,
        incomplete_silence_ms=1200,
        turn_end_timeout_ms=64,
    )
    with ThreadPoolExecutor(1) as pool:
        turns = run_with(
            Stuck([]), np.concatenate([silence(0.5), tone(1.0), silence(1.0)]), config, pool
        )
        release.set()
    assert len(turns) == 1
    assert abs(_endpoint_ms(turns[0]) - 320) <= 32
    assert sum("no answer within 64 ms" in r.getMessage() for r in caplog.records) == 1


def test_late_answer_past_the_short_end_is_still_used() -> None:
    # The audio outruns a slow model (pushed at once): the decision waits for the answer,
    # the audio does not, and an answer inside the timeout still ends the turn then.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()

    class Slow(ScriptedTurnEnd):
        def complete_probability(self, audio: np.ndarray) -> float:
            release.wait(5)
            return 0.9

    config = TurnConfig(
        turn_end_ask_ms=96,
        complete_silence_ms=192,
        incomplete_silence_ms=1200,
        turn_end_timeout_ms=1000,
    )
    with ThreadPoolExecutor(1) as pool:
        detector = TurnDetector(config, EnergyVadStream(), turn_end=Slow([]), executor=pool)
        started = time.perf_counter()
        events = detector.push(np.concatenate([silence(0.5), tone(1.0), silence(0.4)]))
        assert time.perf_counter() - started < 1.0  # push did not wait for the model
        assert not [e for e in events if isinstance(e, UserTurn)]
        release.set()
        time.sleep(0.05)
        turns = [e for e in detector.push(silence(0.04)) if isinstance(e, UserTurn)]
    assert len(turns) == 1 and turns[0].complete_probability == 0.9
    assert abs(_endpoint_ms(turns[0]) - 448) <= 32  # 0.4 s + 40 ms: ended as soon as known


def test_model_runs_on_the_executor_while_audio_flows() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    callers: list[str] = []

    class Recording(ScriptedTurnEnd):
        def complete_probability(self, audio: np.ndarray) -> float:
            callers.append(threading.current_thread().name)
            return super().complete_probability(audio)

    with ThreadPoolExecutor(1, thread_name_prefix="turn-end") as pool:
        turns = run_with(
            Recording([0.8]),
            np.concatenate([tone(0.5), silence(0.6)]),
            MODEL_CONFIG,
            pool,
            real_time=True,
        )
    assert callers and callers[0].startswith("turn-end")
    assert abs(_endpoint_ms(turns[0]) - 192) <= 32


def test_no_model_keeps_plain_silence_timing() -> None:
    turns = [
        e
        for e in run(MODEL_CONFIG, np.concatenate([silence(0.5), tone(1.0), silence(1.0)]))
        if isinstance(e, UserTurn)
    ]
    assert abs(_endpoint_ms(turns[0]) - 320) <= 32
    assert turns[0].complete_probability is None
