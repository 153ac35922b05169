"""The spool: records waiting for the database, in a local JSON-lines file that survives a crash.

Appends are all-or-nothing (a failed write is cut back off), fsynced, and safe across threads
and processes (flock). A replay takes the file away by renaming it, so appends never wait for
the database; each ``*.replay`` file is claimed with a lock by one replayer at a time, and a
crash during a replay leaves the file for the next one (records are idempotent).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from voicebot.store.records import Record, sql_params

logger = logging.getLogger(__name__)


class Spool:
    """An append-only JSON-lines file of records waiting for the database (see the module)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        """Append and fsync. Raises OSError when the disk refuses."""
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    try:
                        current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:
                        current = False
                    if not current:  # renamed away by a replay between open and flock
                        continue
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        data = b"\n" + data  # a previous writer died mid-line: keep lines apart
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                        os.fsync(fd)
                    except OSError:
                        # All or nothing: a record is either spooled or reported lost, never
                        # both (a torn tail would be replayed after being counted as lost).
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)
                        raise
                    if size == 0:
                        _fsync_dir(self.path.parent)
                    return
                finally:
                    os.close(fd)

    def pending(self) -> bool:
        """Whether any record waits in the spool (or in an unfinished replay)."""
        try:
            if self.path.stat().st_size > 0:
                return True
        except OSError:  # absent, or its directory unusable (then append says why)
            pass
        try:
            return bool(self._replay_files())
        except OSError:
            return False

    def take(self) -> list[Path]:
        """Move the current spool aside and return every file awaiting replay, oldest first."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if (
                        os.fstat(fd).st_size > 0
                        and os.stat(self.path).st_ino == os.fstat(fd).st_ino
                    ):
                        stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
                        os.rename(
                            self.path, self.path.with_name(f"{self.path.name}.{stamp}.replay")
                        )
                except FileNotFoundError:
                    pass
                finally:
                    os.close(fd)
        return self._replay_files()

    @staticmethod
    @contextlib.contextmanager
    def claim(path: Path) -> Iterator[list[Record] | None]:
        """Lock one ``*.replay`` file for this replayer: yields its records, or None when another
        process holds it (or has finished it). The caller unlinks it inside the block once
        stored; the lock is released on exit."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # replayed and removed between our open and our lock
                yield None
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
            yield Spool.parse(raw, path)
        finally:
            os.close(fd)

    def _replay_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.*.replay"))

    @staticmethod
    def read(path: Path) -> list[Record]:
        """The valid records of one spool file; corrupted lines are skipped with a warning."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:  # another process replayed it meanwhile
            return []
        return Spool.parse(raw, path)

    @staticmethod
    def parse(raw: bytes, path: Path) -> list[Record]:
        records: list[Record] = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                sql_params(record)
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("skipping corrupted spool line %s:%d (%s)", path, number, e)
                continue
            records.append(record)
        return records


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
