"""Short versions of the soaks in ``scripts/``: what a burst of calls leaves behind.

The churn in ``tests/test_lines.py`` runs on fakes; here the voice is real (piper joe), because
the threads a burst of short calls left were queued on the real voice's lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from tests import fakes
from tests.support_served import served_runtime
from tests.support_voice import joe
from voicebot.call.session import Call

GREETING = "Hello and welcome to the test line, how can I help you today?"


def _reply_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("reply-")]


def test_calls_ended_while_their_greeting_waits_for_the_voice_leave_no_thread(
    joe_voice_path: Path,
) -> None:
    """A burst of calls that hang up at once: each greeting's synthesis is still waiting for
    the shared voice when its call ends. The old core synthesized every one of them anyway,
    one after the other (a 500-cycle churn left ~200 threads for a minute and starved the live
    calls of TTS); now a cancel reaches a synthesis that waits, and the threads end at once."""
    voice = joe(joe_voice_path)
    t0 = time.monotonic()
    assert list(voice.synthesize(GREETING))
    one_greeting_s = time.monotonic() - t0
    print(f"\nvoice loaded and one greeting in {one_greeting_s:.2f} s")
    t0 = time.monotonic()
    assert list(voice.synthesize(GREETING))
    one_greeting_s = time.monotonic() - t0
    runtime = served_runtime()
    runtime = dataclasses.replace(
        runtime,
        stacks={
            name: dataclasses.replace(
                stack, synthesizer=voice, persona=fakes.persona("en", greeting=GREETING)
            )
            for name, stack in runtime.stacks.items()
        },
    )
    assert not _reply_threads()
    n = 16
    calls = [Call(runtime) for _ in range(n)]
    for call in calls:
        call.start()
    time.sleep(0.05)  # every greeting is on its way to the voice
    hung_up = time.monotonic()
    for call in calls:
        call.shutdown()
    # The greeting being synthesized finishes; the rest give up. The old core took n times
    # one greeting.
    deadline = hung_up + 4 * one_greeting_s + 0.5
    while _reply_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    left = _reply_threads()
    print(
        f"{n} calls hung up during their greetings: reply threads gone in "
        f"{time.monotonic() - hung_up:.2f} s (one greeting takes {one_greeting_s:.2f} s)"
    )
    assert not left, left
