"""The served app: factory and mount, access control, limits, API and live transcripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support_served import LiveServer, backend_of, served_runtime
from tests.support_voice import (
    KeywordScript,
    Timeline,
    joe,
    say,
    subprocess_env,
    voicebot_command,
)
from voicebot.errors import ConfigError
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.server import Backend, create_app, is_loopback, mount
from voicebot.settings import Settings

TOKEN = "s3cret-token-for-tests"


def counting_backend(counter: list[int], dsn: str | None = None) -> Any:
    @contextlib.contextmanager
    def factory(settings: Settings) -> Iterator[Backend]:
        counter.append(1)
        yield Backend(served_runtime(), dsn)

    return factory


# --- factory and mount ------------------------------------------------------------------------


def _route_paths(routes: Any) -> set[str]:
    """Every route path, looking into included routers (FastAPI may include them lazily)."""
    paths: set[str] = set()
    for route in routes:
        if getattr(route, "path", None):
            paths.add(route.path)
        included = getattr(route, "original_router", None)
        if included is not None:
            paths |= _route_paths(included.routes)
    return paths


def test_import_is_light_and_exports_are_lazy() -> None:
    code = (
        "import sys, voicebot; "
        "assert 'fastrtc' not in sys.modules and 'voicebot.server' not in sys.modules; "
        "f = voicebot.create_app; m = voicebot.mount; "
        "assert 'voicebot.server' in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_two_mounts_share_one_load_and_do_not_collide(tmp_path: Path) -> None:
    loads: list[int] = []
    factory = counting_backend(loads)
    settings = Settings(data_dir=tmp_path, api_token=TOKEN)
    app = FastAPI()

    @app.get("/mine")
    def mine() -> dict[str, str]:
        return {"owner": "host app"}

    a = mount(app, "/a", settings=settings, backend=factory)
    b = mount(app, "/b", settings=settings, backend=factory)
    paths = _route_paths(app.routes)
    for prefix in ("/a", "/b"):
        for route in (
            "/webrtc/offer",
            "/websocket/offer",
            "/telephone/incoming",
            "/telephone/handler",
            "/api/personas",
            "/api/conversations",
            "/api/conversations/{conversation_id}",
            "/api/conversations/{conversation_id}/events",
            "/api/calls/{call_id}/events",
            "/healthz",
            "/readyz",
            "/metrics",
        ):
            assert prefix + route in paths
    assert loads == []  # nothing loads before the lifespan
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        assert loads == [1]  # once, for both mounts
        assert a.runtime is b.runtime
        for prefix in ("/a", "/b"):
            assert client.get(f"{prefix}/api/personas", headers=auth).status_code == 200
            assert client.get(f"{prefix}/api/personas").status_code == 401
        assert client.get("/mine").json() == {"owner": "host app"}  # the host's routes are free
        assert a.metrics.registry is not b.metrics.registry
    assert a.backend is None and b.backend is None  # released with the lifespan


def test_concurrency_and_time_limits_are_explicit(tmp_path: Path) -> None:
    app = FastAPI()
    service = mount(
        app,
        "/v",
        settings=Settings(data_dir=tmp_path, concurrency_limit=5, time_limit_s=42),
        backend=backend_of(served_runtime()),
    )
    assert service.stream.concurrency_limit == 5  # not FastRTC's default of 1
    assert service.stream.time_limit is not None and service.stream.time_limit > 42
    with pytest.raises(ConfigError):
        mount(FastAPI(), settings=Settings(data_dir=tmp_path, concurrency_limit=0))


# --- access control ---------------------------------------------------------------------------


def test_refuses_to_bind_publicly_without_a_token(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(ConfigError, match="VOICEBOT_API_TOKEN"):
        create_app(Settings(data_dir=tmp_path, host="0.0.0.0"))
    create_app(Settings(data_dir=tmp_path, host="0.0.0.0", api_token=TOKEN))  # fine with one

    from voicebot.cli import app as cli

    result = CliRunner().invoke(
        cli, ["serve", "--host", "0.0.0.0", "--no-ui"], env={"VOICEBOT_DATA_DIR": str(tmp_path)}
    )
    assert result.exit_code == 2
    assert "VOICEBOT_API_TOKEN" in result.output


def _aiortc_offer() -> dict[str, Any]:
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    async def make() -> dict[str, Any]:
        pc = RTCPeerConnection()
        pc.addTrack(AudioStreamTrack())
        pc.createDataChannel("text")
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": uuid.uuid4().hex}
        await pc.close()
        return offer

    return asyncio.run(make())


def test_every_protected_route_needs_the_token(
    tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(data_dir=tmp_path, api_token=TOKEN)
    app = create_app(settings, ui=True, backend=backend_of(served_runtime(), pg_dsn))
    cid = uuid.uuid4()
    gets = [
        "/api/personas",
        "/api/conversations",
        f"/api/conversations/{cid}",
        "/metrics",
        "/ui/",
    ]
    good = {"Authorization": f"Bearer {TOKEN}"}
    with (
        LiveServer(app, log_level="info") as live,
        httpx.Client(base_url=live.http, timeout=30) as http,
    ):
        for path in gets:
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get(path, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
            status = http.get(path, headers=good).status_code
            assert status in (200, 404), (path, status)  # 404: that conversation does not exist
        for path in (f"/api/conversations/{cid}/events", "/api/calls/nope/events"):
            assert http.get(path).status_code == 401
            with http.stream("GET", path, headers=good) as reply:
                assert reply.status_code in (200, 404)
        offer = _aiortc_offer()
        assert http.post("/webrtc/offer", json=offer).status_code == 401
        answered = http.post("/webrtc/offer", json=offer, headers=good)
        assert answered.status_code == 200 and answered.json()["type"] == "answer"
        form = {"From": "+15550000000", "To": "+15551111111"}
        assert http.post("/telephone/incoming", data=form).status_code == 401
        assert http.post("/telephone/incoming", data=form, headers=good).status_code == 200
        # the page: ?token= once, then a cookie carries it
        page = http.get("/ui/", params={"token": TOKEN})
        assert page.status_code == 200
        assert "voicebot_token" in page.headers.get("set-cookie", "")
        assert "HttpOnly" in page.headers["set-cookie"]
        # health probes stay open
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code in (200, 503)

        async def sockets() -> None:
            for path in ("/websocket/offer", "/telephone/handler"):
                with pytest.raises(InvalidStatus) as denied:
                    async with connect(f"{live.ws}{path}"):
                        pass
                assert denied.value.response.status_code == 401
                with pytest.raises(InvalidStatus):
                    async with connect(f"{live.ws}{path}?token=wrong"):
                        pass
                start = {"event": "start", "websocket_id": "w1", "streamSid": "MZ1"}
                async with connect(f"{live.ws}{path}?token={TOKEN}") as ws:
                    await ws.send(json.dumps(start))
                    await ws.send(json.dumps({"event": "stop"}))
                async with connect(f"{live.ws}{path}", additional_headers=good) as ws:
                    await ws.send(json.dumps(start))
                    await ws.send(json.dumps({"event": "stop"}))

        asyncio.run(sockets())
    # never logged by the server side (the test's own HTTP clients do log what they send)
    server_side = [
        r.getMessage()
        for r in caplog.records
        if r.name.split(".")[0] in ("voicebot", "uvicorn", "fastrtc", "gradio", "starlette")
    ]
    assert server_side and not any(TOKEN in m for m in server_side)
    # at INFO, the level users run: uvicorn's websocket lines were written, masked
    assert any("[accepted]" in m and "token=***" in m for m in server_side)


def test_body_limits_and_cors(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_body_bytes=1000)
    app = create_app(settings, backend=backend_of(served_runtime()))
    big = {"sdp": "x" * 5000, "type": "offer", "webrtc_id": "a"}
    with TestClient(app) as client:
        assert client.post("/webrtc/offer", json=big).status_code == 413

        def chunks() -> Iterator[bytes]:
            yield json.dumps(big).encode()

        assert client.post("/webrtc/offer", content=chunks()).status_code == 413  # no length
        preflight = client.options(
            "/api/personas",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in preflight.headers  # CORS off by default
    cors = Settings(data_dir=tmp_path, cors_origins=["https://app.example"])
    with TestClient(create_app(cors, backend=backend_of(served_runtime()))) as client:
        preflight = client.options(
            "/api/personas",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_readyz_names_each_check(tmp_path: Path, pg_dsn: str) -> None:
    with OllamaProtocolServer("instant") as ollama:
        settings = Settings(data_dir=tmp_path, ollama_host=ollama.base_url)
        app = create_app(settings, backend=backend_of(served_runtime(), pg_dsn))
        with TestClient(app) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert body["ready"] is True
            assert set(body["checks"]) == {"models", "ollama", "database"}
    down = Settings(data_dir=tmp_path, ollama_host="http://127.0.0.1:9")
    with TestClient(create_app(down, backend=backend_of(served_runtime(), pg_dsn))) as client:
        reply = client.get("/readyz")
        assert reply.status_code == 503
        checks = reply.json()["checks"]
        assert not checks["ollama"]["ok"] and checks["database"]["ok"] and checks["models"]["ok"]


# --- live transcripts across processes ---------------------------------------------------------


def test_sse_follows_a_call_simulated_in_another_process(
    tmp_path: Path, pg_dsn: str, tiny_en_model_dir: Path, joe_voice_path: Path
) -> None:
    script = KeywordScript([("france", "Paris is the capital of France.")], default="Okay.")
    voice = joe(joe_voice_path)
    call = (
        Timeline(voice.sample_rate)
        .silence(0.5)
        .clip(say(voice, "What is the capital of France?"))
        .silence(7.0)  # the answer is over, even on a loaded machine: no overlap
        .clip(say(voice, "Thank you very much for your help with that."))
        .silence(2.0)
    )
    wav = tmp_path / "call.wav"
    soundfile.write(wav, call.audio[1], call.rate)
    cid = uuid.uuid4()
    settings = Settings(data_dir=tmp_path / "server")
    app = create_app(settings, backend=backend_of(served_runtime(), pg_dsn))
    events: list[dict[str, Any]] = []
    with (
        OllamaProtocolServer("instant", script=script) as ollama,
        LiveServer(app) as live,
    ):
        connected = threading.Event()

        def listen() -> None:
            url = f"{live.http}/api/conversations/{cid}/events"
            with httpx.stream("GET", url, timeout=120) as reply:
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/event-stream")
                kind = ""
                for line in reply.iter_lines():
                    if line.startswith(": connected"):
                        connected.set()
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "turn":
                        events.append(json.loads(line[6:]))
                        if len(events) >= 2:
                            return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert connected.wait(30)
        proc = subprocess.run(
            [
                *voicebot_command(),
                "simulate",
                str(wav),
                "--persona",
                "assistant-en",
                "--conversation",
                str(cid),
                "--stt-model",
                str(tiny_en_model_dir),
                "--tts-voice",
                str(joe_voice_path),
                "--ollama-host",
                ollama.base_url,
            ],
            env=subprocess_env(tmp_path / "sim", VOICEBOT_DATABASE_URL=pg_dsn),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        listener.join(30)
        assert len(events) >= 2, proc.stdout
        first = events[0]
        assert first["conversation_id"] == str(cid)
        assert "france" in first["user_text"].lower()
        assert first["assistant_text"].startswith("Paris")
        assert first["timings"]["v2v_ms"] is not None
        # the same turns, with timings, from the turn log's API
        with httpx.Client(base_url=live.http, timeout=30) as http:
            detail = http.get(f"/api/conversations/{cid}").json()
            assert [t["turn"] for t in detail["turns"]][:2] == [1, 2]
            assert detail["turns"][0]["timings"]["stt_ms"] is not None
            assert detail["channel"] == "simulate"
            listed = http.get("/api/conversations", params={"limit": 50}).json()
            assert any(c["id"] == str(cid) and c["turns"] >= 2 for c in listed)
            assert http.get(f"/api/conversations/{uuid.uuid4()}").status_code == 404


def test_call_events_stream_the_callers_own_turns(tmp_path: Path) -> None:
    from tests.fakes import tone
    from tests.test_telephony import TwilioClient, to_8k

    settings = Settings(data_dir=tmp_path, concurrency_limit=2)
    app = create_app(settings, backend=backend_of(served_runtime()))
    updates: list[dict[str, Any]] = []
    with LiveServer(app) as live:

        async def scenario() -> None:
            async with (
                TwilioClient(f"{live.ws}/telephone/handler") as caller,
                httpx.AsyncClient(timeout=30) as http,
            ):
                await caller.wait_for(lambda: caller.heard.marks, 10)
                url = f"{live.http}/api/calls/{caller.stream_sid}/events"
                async with http.stream("GET", url) as reply:
                    assert reply.status_code == 200
                    await caller.speak(to_8k((16000, tone(0.8))))
                    speaking = asyncio.ensure_future(caller.wait_for(lambda: False, 10))
                    kind = ""
                    async for line in reply.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: ") and kind == "turn":
                            updates.append(json.loads(line[6:]))
                            # the greeting (turn 0) may come first; wait for the caller's turn
                            if updates[-1]["final"] and updates[-1]["turn"]["turn"] > 0:
                                break
                    speaking.cancel()
                await caller.stop()

        asyncio.run(asyncio.wait_for(scenario(), 60))
    assert updates[-1]["final"] is True
    assert updates[-1]["turn"]["user_text"] == "hello there"
    assert updates[-1]["turn"]["assistant_text"] == "Sure. Here is a short answer."
    assert np.isfinite(updates[-1]["turn"]["timings"]["v2v_ms"])


def test_phone_trial_without_a_token_says_what_is_missing(tmp_path: Path) -> None:
    from voicebot.cli import app as cli

    env = {"VOICEBOT_DATA_DIR": str(tmp_path), "HF_TOKEN": ""}
    result = CliRunner().invoke(cli, ["phone"], env=env)
    assert result.exit_code == 2
    assert "HF_TOKEN" in result.output and "Hugging Face token" in result.output
