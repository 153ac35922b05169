"""SIGTERM drains a real ``voicebot serve`` and a real ``voicebot ui``: it stops admitting at once
(readiness 503, new calls hear why), lets the call in progress go on until
VOICEBOT_DRAIN_TIMEOUT_S, ends it with the persona's goodbye, records every turn and exits 0.

Real models (tiny.en, piper joe), the project's Ollama-protocol server, embedded PostgreSQL; for
``serve`` a client speaking FastRTC's websocket protocol, for ``ui`` an aiortc caller that does
what the page's browser code does (its offer and inputs go through Gradio's own routes), asking
the page to continue a phone conversation, which it must not.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from websockets.asyncio.client import connect

from tests.support_served import WS_RATE, FastRTCSocket, RtcCaller, until
from tests.support_voice import (
    KeywordScript,
    free_port,
    joe,
    say,
    subprocess_env,
    voicebot_command,
)
from voicebot.audio import resample
from voicebot.conversation import Conversation, Turn
from voicebot.ollama_server import OllamaProtocolServer

DRAIN_S = 3.0
ANSWER = "Paris is the capital of France."
TOKEN = "tok-" + secrets.token_urlsafe(18)
"""``ui`` runs with a token: its page then wants ``?token=`` once, and no log line shows it."""


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_sigterm_drains_the_call_then_exits_0(
    command: str, tmp_path: Path, pg_fresh_dsn: str, tiny_en_model_dir: Path, joe_voice_path: Path
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    shutil.copy(Path(__file__).parent.parent / "personas" / "assistant-en.toml", personas)
    rate, question = say(joe(joe_voice_path), "What is the capital of France?")
    speech = resample(question, rate, WS_RATE)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    phone = uuid.uuid4()  # a phone conversation the page is asked to continue
    with OllamaProtocolServer("instant", script=KeywordScript([("france", ANSWER)])) as ollama:
        server = subprocess.Popen(
            [
                *voicebot_command(),
                *(["serve", "--no-ui"] if command == "serve" else ["ui"]),
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
                **({"VOICEBOT_API_TOKEN": TOKEN} if command == "ui" else {}),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            if command == "serve":
                call = _call_and_drain(base, server, speech)
            else:
                call = _page_call_and_drain(base, server, speech, pg_fresh_dsn, phone, tmp_path)
            timeline = asyncio.run(asyncio.wait_for(call, 180))
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
    channel = "api" if command == "serve" else "web"
    with psycopg.connect(pg_fresh_dsn) as conn:
        rows = conn.execute(
            "SELECT c.id, c.ended_at, t.user_text, t.assistant_text FROM conversations c "
            "JOIN turns t ON t.conversation_id = c.id WHERE c.channel = %s ORDER BY t.seq",
            (channel,),
        ).fetchall()
        seeded = conn.execute(
            "SELECT persona, channel, started_at, caller_ref, "
            "(SELECT count(*) FROM turns WHERE conversation_id = %s) FROM conversations "
            "WHERE id = %s",
            (phone, phone),
        ).fetchone()
    assert rows, out[-3000:]
    assert all(r[1] is not None for r in rows), "the drained conversation has no ended_at"
    assert "france" in rows[0][2].lower() and rows[0][3].startswith("Paris"), rows
    if command == "ui":
        # At INFO (the level users run it) the log holds neither the token nor what the
        # caller said (tests/test_logs.py runs `ui` at DEBUG).
        assert TOKEN not in out and "capital of france" not in out.lower(), out[-3000:]
        # The page asked to continue the phone conversation: refused, a new one was started
        # and the phone conversation was left as it was.
        assert phone not in {r[0] for r in rows}, rows
        assert seeded == ("assistant-en", "phone", PHONE_STARTED, "h:1", 1), seeded
        assert "not continuing conversation" in out, out[-3000:]


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


PHONE_STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _store_phone_conversation(dsn: str, conversation_id: uuid.UUID, spool: Path) -> None:
    from voicebot.store import PostgresTurnStore

    store = PostgresTurnStore(dsn, spool, 10).start()
    try:
        store.open_conversation(
            Conversation(conversation_id, "assistant-en", "phone", PHONE_STARTED, caller_ref="h:1")
        )
        store.record(Turn(conversation_id, 1, "a private question", "an answer"))
        assert store.flush(10)
    finally:
        store.close()


async def _page_call_and_drain(
    base: str,
    server: subprocess.Popen[str],
    speech: np.ndarray,
    dsn: str,
    phone: uuid.UUID,
    tmp_path: Path,
) -> tuple[float, float]:
    """A page call as the browser makes it: the offer through the WebRTC component's server
    function, the page's inputs (persona, a conversation to continue) through Gradio's queue
    when the server asks for them."""
    session = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        deadline = time.monotonic() + 150
        page: httpx.Response | None = None
        while page is None:  # the port opens once the models are loaded
            assert server.poll() is None, "voicebot ui exited during start-up"
            assert time.monotonic() < deadline, "voicebot ui never served its page"
            try:
                page = await http.get("/")
            except httpx.HTTPError:
                await asyncio.sleep(0.3)
        # Guarded: nothing without the token; `?token=` once, then its cookie carries it.
        assert page.status_code == 401
        assert (await http.get("/gradio_api/info")).status_code == 401
        assert (await http.get("/", params={"token": "wrong"})).status_code == 401
        visit = await http.get("/", params={"token": TOKEN})
        assert visit.status_code == 200 and "voicebot_token" in visit.headers["set-cookie"]
        config = (await http.get("/config")).json()
        webrtc = next(c["id"] for c in config["components"] if c["type"] == "webrtc")
        inputs = next(
            i for i, d in enumerate(config["dependencies"]) if d["targets"] == [[webrtc, "tick"]]
        )
        await asyncio.to_thread(_store_phone_conversation, dsn, phone, tmp_path / "spool.jsonl")

        async def offer(body: dict[str, Any]) -> Any:
            reply = await http.post(
                "/gradio_api/component_server",
                json={
                    "data": body,
                    "component_id": webrtc,
                    "fn_name": "offer",
                    "session_hash": session,
                },
            )
            return reply.json()

        caller = RtcCaller(base)
        answered: list[asyncio.Future[Any]] = []

        def on_message(message: dict[str, Any]) -> None:
            if message.get("type") == "send_input":
                body = {
                    "data": [caller.webrtc_id, "assistant-en", str(phone)],
                    "fn_index": inputs,
                    "trigger_id": webrtc,
                    "session_hash": session,
                    "event_data": None,
                }
                join = http.post("/gradio_api/queue/join", json=body)
                answered.append(asyncio.ensure_future(join))

        caller.on_message = on_message

        def ended() -> bool:
            done = bool(caller.tasks) and all(t.done() for t in caller.tasks)
            return done or any(m.get("type") == "end_stream" for m in caller.messages)

        try:
            reply = await caller.connect(offer)
            assert "sdp" in reply, reply
            assert await until(lambda: caller.loud_since(0), 30), "no greeting"
            assert await until(lambda: _quiet_for(caller, 0.6), 30), "the greeting never ended"
            assert answered and (await answered[0]).status_code == 200, caller.messages
            caller.say(np.concatenate([speech, np.zeros(WS_RATE // 2, np.float32)]))
            assert await until(lambda: caller.speech_end_t is not None, 15)
            assert caller.speech_end_t is not None
            assert await until(lambda: caller.loud_since(caller.speech_end_t or 0), 30), "no answer"
            await asyncio.sleep(2.0)  # the answer plays on

            server.send_signal(signal.SIGTERM)
            sigterm_t = time.monotonic()
            late = await offer(
                {"sdp": "v=0\nm=audio 9\na=ice-ufrag:x", "type": "offer", "webrtc_id": "late"}
            )
            assert late["meta"]["error"] == "server_draining", late
            assert not ended(), "the call in progress was cut at once"

            assert await until(ended, DRAIN_S + 30)
            closed_t = time.monotonic()
            assert caller.loud_since(sigterm_t + DRAIN_S - 0.5), "no goodbye"
        finally:
            await caller.close()
    return sigterm_t, closed_t


def _quiet_for(caller: RtcCaller, seconds: float) -> bool:
    loud = [at for at, peak in caller.frames if peak > 0.05]
    return bool(loud) and time.monotonic() - loud[-1] >= seconds
