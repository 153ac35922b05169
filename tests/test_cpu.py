"""Thread counts derived from the cores, and the synthesis gate's order (no models)."""

from __future__ import annotations

import threading
import time

import pytest

from voicebot.cpu import (
    FIRST_CHUNK,
    LATER_CHUNK,
    PriorityGate,
    ThreadPlan,
    available_cores,
    current_synthesis_priority,
    synthesis_priority,
    thread_plan,
)
from voicebot.errors import ConfigError
from voicebot.settings import Settings


@pytest.mark.parametrize(
    ("cores", "plan"),
    [
        (None, ThreadPlan(stt_workers=1, stt_threads=1, tts_threads=1)),
        (1, ThreadPlan(stt_workers=1, stt_threads=1, tts_threads=1)),
        (2, ThreadPlan(stt_workers=1, stt_threads=2, tts_threads=1)),
        (3, ThreadPlan(stt_workers=1, stt_threads=3, tts_threads=1)),
        (4, ThreadPlan(stt_workers=2, stt_threads=2, tts_threads=2)),
        (8, ThreadPlan(stt_workers=4, stt_threads=2, tts_threads=4)),
        (16, ThreadPlan(stt_workers=4, stt_threads=4, tts_threads=8)),
    ],
)
def test_thread_plan_from_the_core_count(cores: int | None, plan: ThreadPlan) -> None:
    derived = thread_plan(cores)
    assert derived == plan
    # whisper alone never runs more threads than there are cores
    assert derived.stt_workers * derived.stt_threads <= max(1, cores or 1)


def test_thread_plan_overrides() -> None:
    assert thread_plan(2, stt_workers=2) == ThreadPlan(2, 1, 1)
    assert thread_plan(2, stt_threads=4) == ThreadPlan(1, 4, 1)
    assert thread_plan(8, stt_workers=2, stt_threads=3, tts_threads=5) == ThreadPlan(2, 3, 5)
    with pytest.raises(ConfigError, match="stt_workers"):
        thread_plan(2, stt_workers=-1)


def test_settings_default_to_derived_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.stt_workers, settings.stt_cpu_threads, settings.tts_threads) == (0, 0, 0)
    monkeypatch.setenv("VOICEBOT_STT_WORKERS", "1")
    monkeypatch.setenv("VOICEBOT_TTS_THREADS", "2")
    settings = Settings()
    assert (settings.stt_workers, settings.tts_threads) == (1, 2)
    monkeypatch.setenv("VOICEBOT_STT_WORKERS", "-1")
    with pytest.raises(ValueError, match="stt_workers"):
        Settings()


def test_available_cores() -> None:
    assert available_cores() >= 1


def test_synthesis_priority_is_per_block_and_per_thread() -> None:
    assert current_synthesis_priority() == FIRST_CHUNK
    seen: list[int] = []
    with synthesis_priority(LATER_CHUNK):
        assert current_synthesis_priority() == LATER_CHUNK
        other = threading.Thread(target=lambda: seen.append(current_synthesis_priority()))
        other.start()
        other.join()
    assert current_synthesis_priority() == FIRST_CHUNK
    assert seen == [FIRST_CHUNK]


def _queue_behind(gate: PriorityGate, entries: list[tuple[str, int]]) -> list[str]:
    """Hold the gate, queue ``entries`` (name, priority) in that order, release; the order
    in which they got the gate."""
    order: list[str] = []
    gate.acquire(FIRST_CHUNK)

    def take(name: str, priority: int) -> None:
        with gate.hold(priority):
            order.append(name)

    threads = []
    for k, (name, priority) in enumerate(entries):
        thread = threading.Thread(target=take, args=(name, priority))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while gate.waiting() < k + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert gate.waiting() == k + 1
    gate.release()
    for thread in threads:
        thread.join(5)
    return order


def test_gate_serves_first_chunks_before_later_ones_in_arrival_order() -> None:
    order = _queue_behind(
        PriorityGate(),
        [
            ("call1-chunk2", LATER_CHUNK),
            ("call2-chunk1", FIRST_CHUNK),
            ("call1-chunk3", LATER_CHUNK),
            ("call3-chunk1", FIRST_CHUNK),
        ],
    )
    assert order == ["call2-chunk1", "call3-chunk1", "call1-chunk2", "call1-chunk3"]


def test_gate_takes_the_threads_priority() -> None:
    gate = PriorityGate()
    order: list[str] = []
    gate.acquire(FIRST_CHUNK)

    def take(name: str, priority: int) -> None:
        with synthesis_priority(priority), gate.hold():
            order.append(name)

    later = threading.Thread(target=take, args=("later", LATER_CHUNK))
    later.start()
    while gate.waiting() < 1:
        time.sleep(0.001)
    first = threading.Thread(target=take, args=("first", FIRST_CHUNK))
    first.start()
    while gate.waiting() < 2:
        time.sleep(0.001)
    gate.release()
    later.join(5)
    first.join(5)
    assert order == ["first", "later"]


def test_gate_is_exclusive_and_survives_an_exception() -> None:
    gate = PriorityGate()
    inside = [0]
    most = [0]

    def work() -> None:
        for _ in range(50):
            with gate.hold(FIRST_CHUNK):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most[0] == 1
    with pytest.raises(KeyError), gate.hold(LATER_CHUNK):
        raise KeyError("boom")
    with gate.hold(FIRST_CHUNK):  # released despite the exception
        pass
    with pytest.raises(RuntimeError, match="not held"):
        gate.release()


def test_a_cancelled_waiter_gives_up_its_place() -> None:
    gate = PriorityGate()
    gate.acquire(FIRST_CHUNK)  # another call's sentence
    cancel = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire(FIRST_CHUNK, cancel)))
    waiter.start()
    while gate.waiting() < 1:
        time.sleep(0.001)
    cancel.set()  # its call ended while it waited for the voice
    waiter.join(5)
    assert got == [False] and gate.waiting() == 0
    gate.release()
    assert gate.acquire(LATER_CHUNK, threading.Event())  # the gate is free, not held by it
    gate.release()
