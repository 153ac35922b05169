"""Readiness a load balancer can use: cheap, cached, 503 when full, draining or without the LLM,
details only with the token; free lines as a metric."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.support_served import backend_of, served_runtime
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.server import create_app
from voicebot.server.service import services_of
from voicebot.settings import Settings

TOKEN = "readiness-token-for-tests"


def test_readyz_is_cached_bare_without_the_token_and_503_when_full_or_draining(
    tmp_path: Path,
) -> None:
    with OllamaProtocolServer("instant") as ollama:
        settings = Settings(
            data_dir=tmp_path, ollama_host=ollama.base_url, api_token=TOKEN, concurrency_limit=2
        )
        app = create_app(settings, backend=backend_of(served_runtime()))
        (service,) = services_of(app)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with TestClient(app) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            bare = client.get("/readyz")
            assert bare.status_code == 200
            assert bare.json() == {"ready": True, "status": "ready"}  # no names, no URLs
            assert client.get("/readyz", headers={"Authorization": "Bearer wrong"}).json() == {
                "ready": True,
                "status": "ready",
            }
            detailed = client.get("/readyz", headers=auth).json()
            assert detailed["free_lines"] == 2 and detailed["limit"] == 2
            assert ollama.base_url in detailed["checks"]["ollama"]["detail"]
            assert "test-en" in detailed["checks"]["models"]["detail"]
            assert detailed["checks"]["database"]["required"] is False

            # Cheap: probes read cached state, they never reach the LLM server.
            before = sum(1 for r in ollama.requests if r.path == "/api/version")
            for _ in range(40):
                assert client.get("/readyz").status_code == 200
            after = sum(1 for r in ollama.requests if r.path == "/api/version")
            assert after - before <= 1, (before, after)

            # Full: every line busy.
            lines = [service.admit("api", f"probe-{i}") for i in range(2)]
            assert all(lines)
            full = client.get("/readyz")
            assert full.status_code == 503 and full.json()["status"] == "full"
            assert "voicebot_lines_free 0.0" in client.get("/metrics", headers=auth).text
            for line in lines:
                assert line is not None
                line.release()
                line.release()  # idempotent: given back once
            assert service.free_lines() == 2
            assert client.get("/readyz").status_code == 200
            assert "voicebot_lines_free 2.0" in client.get("/metrics", headers=auth).text

            # Draining: unready at once, and new calls hear why.
            service.begin_drain()
            assert service.draining
            draining = client.get("/readyz")
            assert draining.status_code == 503 and draining.json()["status"] == "draining"
            offer = {"sdp": "v=0\nm=audio 9\na=ice-ufrag:x", "type": "offer", "webrtc_id": "d"}
            refused = client.post("/webrtc/offer", json=offer, headers=auth)
            assert refused.status_code == 503
            assert refused.json()["meta"]["error"] == "server_draining"
            with client.websocket_connect(f"/websocket/offer?token={TOKEN}") as ws:
                assert ws.receive_json()["meta"]["error"] == "server_draining"
            metrics = client.get("/metrics", headers=auth).text
            assert "voicebot_draining 1.0" in metrics and "voicebot_lines_free 0.0" in metrics
            assert 'reason="draining"' in metrics


def test_readyz_is_503_without_the_llm_server(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, ollama_host="http://127.0.0.1:9")
    with TestClient(create_app(settings, backend=backend_of(served_runtime()))) as client:
        reply = client.get("/readyz")
        assert reply.status_code == 503
        body = reply.json()
        assert body["status"] == "unavailable"
        assert not body["checks"]["ollama"]["ok"]  # no token configured: details (loopback)
        assert client.get("/healthz").status_code == 200
