"""Time for the call: the real clock, or a virtual one that tests advance by hand.

Every wait inside the call core goes through its clock (``now``, ``sleep``, a ``condition``'s
``wait``) and every thread it starts is started by the clock. That is what lets
``VirtualClock`` run a whole call, threads and all, in virtual time: it moves time forward
only when every thread it started is blocked in one of its waits, so a 10 s call whose stages
"take" 50 ms each runs in a fraction of a second and always the same way.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


class Condition(Protocol):
    """A lock with wait/notify, as ``threading.Condition``."""

    def __enter__(self) -> object: ...

    def __exit__(self, *exc: Any) -> Any: ...

    def wait(self, timeout: float | None = None) -> Any:
        """Release the lock until notified or ``timeout`` clock seconds pass, then retake it."""
        ...

    def notify_all(self) -> None: ...


class Clock(Protocol):
    """Where the call core gets its time, its waits and its threads."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    def sleep(self, seconds: float) -> None: ...

    def condition(self) -> Condition:
        """A new condition whose waits this clock can see."""
        ...

    def start_thread(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` on a new daemon thread."""
        ...


class RealClock:
    """Wall time: ``time.monotonic``, real threads and real waits."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def condition(self) -> Condition:
        return threading.Condition(threading.Lock())

    def start_thread(self, target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()


def _stacks() -> str:
    """Where every thread is now, for the error above."""
    import sys
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)[-4:])
        for ident, frame in sys._current_frames().items()
    )


class _Waiter:
    __slots__ = ("deadline", "event", "woken")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.woken = False
        self.event = threading.Event()


class VirtualClock:
    """Time that moves only when ``advance`` is called, and then only once all of its
    threads are waiting: deterministic, and as fast as the CPU allows.

    Threads must be started with ``start_thread`` and must block only in this clock's waits
    (or briefly on a lock): a thread blocked elsewhere looks busy, and ``advance`` gives up
    after ``settle_timeout_s`` real seconds with an error naming the problem.
    """

    def __init__(self, start: float = 1000.0, *, settle_timeout_s: float = 60.0) -> None:
        self._now = start
        self._settle_timeout_s = settle_timeout_s
        self._state = threading.Condition(threading.Lock())
        self._running = 0  # started threads not blocked in one of our waits
        self._timers: list[tuple[float, int, _Waiter]] = []
        self._order = itertools.count()
        self._local = threading.local()

    def now(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        waiter = _Waiter(self._now + seconds)
        self._block(waiter)
        waiter.event.wait()

    def condition(self) -> Condition:
        return _VirtualCondition(self)

    def start_thread(self, target: Callable[[], None], name: str) -> None:
        with self._state:
            self._running += 1

        def run() -> None:
            self._local.ours = True
            try:
                target()
            finally:
                with self._state:
                    self._running -= 1
                    self._state.notify_all()

        threading.Thread(target=run, name=name, daemon=True).start()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, waking each waiter when its time comes."""
        target = self._now + seconds
        with self._state:
            while True:
                self._settle()
                if not self._timers or self._timers[0][0] > target:
                    self._now = max(self._now, target)
                    return
                deadline = self._timers[0][0]
                self._now = max(self._now, deadline)
                while self._timers and self._timers[0][0] <= self._now:
                    _, _, waiter = heapq.heappop(self._timers)
                    self._wake_locked(waiter)

    def settle(self) -> None:
        """Wait (in real time) until every thread of ours is blocked in a virtual wait."""
        with self._state:
            self._settle()

    def _settle(self) -> None:
        give_up = time.monotonic() + self._settle_timeout_s
        while self._running > 0:
            left = give_up - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"virtual clock: {self._running} thread(s) neither finished nor waited on "
                    f"the clock within {self._settle_timeout_s} s (blocked outside the clock?)"
                    f"\n{_stacks()}"
                )
            self._state.wait(left)

    def _block(self, waiter: _Waiter) -> None:
        if not getattr(self._local, "ours", False):
            raise RuntimeError("virtual clock: only threads it started may wait on it")
        with self._state:
            self._running -= 1
            if waiter.deadline != float("inf"):
                heapq.heappush(self._timers, (waiter.deadline, next(self._order), waiter))
            self._state.notify_all()

    def _wake(self, waiter: _Waiter) -> None:
        with self._state:
            self._wake_locked(waiter)

    def _wake_locked(self, waiter: _Waiter) -> None:
        if waiter.woken:
            return
        waiter.woken = True
        self._running += 1  # counted as running from now, before the thread even resumes
        waiter.event.set()


class _VirtualCondition:
    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._waiters: list[_Waiter] = []

    def __enter__(self) -> object:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> None:
        if timeout is not None and timeout <= 0:
            return
        deadline = float("inf") if timeout is None else self._clock.now() + timeout
        waiter = _Waiter(deadline)
        self._waiters.append(waiter)
        self._clock._block(waiter)
        self._lock.release()
        try:
            waiter.event.wait()
        finally:
            self._lock.acquire()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._clock._wake(waiter)
