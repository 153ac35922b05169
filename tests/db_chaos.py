"""Faults between voicebot and PostgreSQL, for tests and ``scripts/measure_db_gaps.py``: a
loopback TCP proxy that delays bytes or stops forwarding them, and a PostgreSQL server's
processes frozen (SIGSTOP) or killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from psycopg import conninfo


def socket_path(dsn: str) -> Path:
    """The unix socket of an embedded server's DSN."""
    params = conninfo.conninfo_to_dict(dsn)
    return Path(str(params["host"])) / f".s.PGSQL.{params.get('port') or 5432}"


class DelayProxy:
    """127.0.0.1:<port> → a PostgreSQL unix socket, every chunk held ``delay_s`` each way.

    ``dsn`` connects through it. ``delay_s`` may change at any time; ``stall()`` stops
    forwarding (connections stay open, bytes wait, as behind a hung network or server) until
    ``resume()``. Runs its own event loop in a thread; ``close()`` drops every connection (as a
    network cut would).
    """

    def __init__(self, target_dsn: str, delay_s: float) -> None:
        self.delay_s = delay_s
        self._target = socket_path(target_dsn)
        self._target_dsn = target_dsn
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def stall(self) -> None:
        """Stop forwarding: every byte either way waits until ``resume()``."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    @property
    def dsn(self) -> str:
        return conninfo.make_conninfo(
            self._target_dsn, host="127.0.0.1", port=str(self.port), sslmode="disable"
        )

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_unix_connection(str(self._target))
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, server_w}
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(self.delay_s)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._writers.discard(writer)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def postmaster_pid(data_dir: Path) -> int:
    """The postmaster of the server whose data directory is ``data_dir``."""
    return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def server_processes(postmaster: int) -> list[int]:
    """The postmaster and its children (backends, checkpointer, WAL writer …)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


def signal_server(postmaster: int, signum: int) -> None:
    """Send ``signum`` to every process of a server (SIGSTOP freezes it whole: stopping only
    the postmaster leaves the backends answering their open connections)."""
    for pid in server_processes(postmaster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.contextmanager
def frozen_server(postmaster: int) -> Iterator[None]:
    """Every process of the server stopped (SIGSTOP) inside, continued (SIGCONT) after."""
    signal_server(postmaster, signal.SIGSTOP)
    try:
        yield
    finally:
        signal_server(postmaster, signal.SIGCONT)
