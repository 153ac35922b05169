"""A bounded queue between two threads whose waits the call's clock can see."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from voicebot.call.clock import Clock

T = TypeVar("T")


class Closed(Exception):
    """The mailbox was closed: no more items will come."""


class Mailbox(Generic[T]):
    """FIFO with a bound: ``put`` waits while it is full, ``get`` while it is empty."""

    def __init__(self, clock: Clock, maxsize: int) -> None:
        self._cond = clock.condition()
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._closed = False

    def put(self, item: T) -> None:
        """Add ``item``; raises ``Closed`` once the mailbox is closed."""
        with self._cond:
            while len(self._items) >= self._maxsize and not self._closed:
                self._cond.wait()
            if self._closed:
                raise Closed
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> T | None:
        """The next item; None after ``timeout`` clock seconds; ``Closed`` once closed and
        empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            if self._closed:
                raise Closed
            return None

    def close(self) -> None:
        """No more puts; ``get`` drains what is left, then raises ``Closed``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
