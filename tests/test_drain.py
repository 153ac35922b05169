"""SIGTERM drains a real ``voicebot serve``: it stops admitting at once (readiness 503, new calls
hear why), lets the call in progress go on until VOICEBOT_DRAIN_TIMEOUT_S, ends it with the
persona's goodbye, records every turn and exits 0.

Real models (tiny.en, piper joe), the project's Ollama-protocol server, embedded PostgreSQL, and
a client speaking FastRTC's websocket protocol.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
from websockets.asyncio.client import connect

from tests.support_served import WS_RATE, FastRTCSocket, until
from tests.support_voice import (
    KeywordScript,
    free_port,
    joe,
    say,
    subprocess_env,
    voicebot_command,
)
from voicebot.audio import resample
from voicebot.ollama_server import OllamaProtocolServer

DRAIN_S = 3.0
ANSWER = "Paris is the capital of France."


def test_sigterm_drains_the_call_then_exits_0(
    tmp_path: Path, pg_fresh_dsn: str, tiny_en_model_dir: Path, joe_voice_path: Path
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    shutil.copy(Path(__file__).parent.parent / "personas" / "assistant-en.toml", personas)
    rate, question = say(joe(joe_voice_path), "What is the capital of France?")
    speech = resample(question, rate, WS_RATE)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with OllamaProtocolServer("instant", script=KeywordScript([("france", ANSWER)])) as ollama:
        server = subprocess.Popen(
            [
                *voicebot_command(),
                "serve",
                "--no-ui",
                "--port",
                str(port),
                "--stt-model",
                str(tiny_en_model_dir),
                "--tts-voice",
                str(joe_voice_path),
                "--ollama-host",
                ollama.base_url,
            ],
            env=subprocess_env(
                tmp_path / "data",
                VOICEBOT_DATABASE_URL=pg_fresh_dsn,
                VOICEBOT_DRAIN_TIMEOUT_S=str(DRAIN_S),
                VOICEBOT_PERSONAS_DIR=str(personas),
                VOICEBOT_CONCURRENCY_LIMIT="2",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            timeline = asyncio.run(asyncio.wait_for(_call_and_drain(base, server, speech), 180))
            out, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate(timeout=10)
    assert server.returncode == 0, out[-3000:]
    assert "draining" in out and "drained" in out, out[-3000:]
    sigterm_t, closed_t = timeline
    # The call went on through the drain timeout, then heard its goodbye and was closed.
    assert closed_t - sigterm_t >= DRAIN_S - 0.5, timeline
    with psycopg.connect(pg_fresh_dsn) as conn:
        rows = conn.execute(
            "SELECT c.id, c.ended_at, t.user_text, t.assistant_text FROM conversations c "
            "JOIN turns t ON t.conversation_id = c.id ORDER BY t.seq"
        ).fetchall()
    assert rows, out[-3000:]
    assert all(r[1] is not None for r in rows), "the drained conversation has no ended_at"
    assert "france" in rows[0][2].lower() and rows[0][3].startswith("Paris"), rows


async def _call_and_drain(
    base: str, server: subprocess.Popen[str], speech: np.ndarray
) -> tuple[float, float]:
    ws_base = base.replace("http", "ws")
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:

        async def ready() -> bool:
            try:
                return (await http.get("/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        deadline = time.monotonic() + 150
        while not await ready():
            assert server.poll() is None, "voicebot serve exited during start-up"
            assert time.monotonic() < deadline, "voicebot serve never became ready"
            await asyncio.sleep(0.3)

        client = await FastRTCSocket(f"{ws_base}/websocket/offer").open()
        await client.start()
        await client.speak(np.zeros(WS_RATE, np.float32))  # the greeting plays meanwhile
        asked = time.monotonic()
        await client.speak(np.concatenate([speech, np.zeros(WS_RATE // 2, np.float32)]))
        keep_talking = asyncio.ensure_future(_silence_until_closed(client))
        assert await until(lambda: client.heard.loud_since(asked + 1.5), 30), "no answer"
        await asyncio.sleep(2.0)  # the answer plays on

        server.send_signal(signal.SIGTERM)
        sigterm_t = time.monotonic()
        status = (await http.get("/readyz")).json()["status"]
        assert status == "draining"
        offer = {"sdp": "v=0\nm=audio 9\na=ice-ufrag:x", "type": "offer", "webrtc_id": "late"}
        late = await http.post("/webrtc/offer", json=offer)
        assert late.status_code == 503 and late.json()["meta"]["error"] == "server_draining"
        async with connect(f"{ws_base}/websocket/offer") as refused:
            assert "server_draining" in str(await asyncio.wait_for(refused.recv(), 5))
        assert not client.heard.closed.is_set(), "the call in progress was cut at once"

        assert await until(lambda: client.heard.closed.is_set(), DRAIN_S + 30)
        closed_t = time.monotonic()
        keep_talking.cancel()
        goodbye = [
            a
            for at, a in zip(client.heard.arrivals, client.heard.audio, strict=True)
            if at >= sigterm_t + DRAIN_S - 0.5
        ]
        assert goodbye and max(float(np.max(np.abs(a))) for a in goodbye) > 0.05, "no goodbye"
        await client.close()
    return sigterm_t, closed_t


async def _silence_until_closed(client: FastRTCSocket) -> None:
    """A caller who stays on the line, quietly."""
    try:
        while not client.heard.closed.is_set():
            await client.speak(np.zeros(WS_RATE // 5, np.float32))
    except Exception:
        return
