"""Deployment matrix: the app behind a real reverse proxy (Debian's nginx) on loopback.

Four ways people serve it, each behind its own nginx location that sets ``X-Forwarded-Proto:
https`` (so the public URL is https/wss while uvicorn listens on plain http):

- ``/a/``: ``create_app``; nginx strips the prefix, uvicorn runs with ``--root-path /a``.
- ``/m/``: ``mount(app, "/voice")``; nginx strips the prefix, uvicorn ``--root-path /m``.
- ``/k/``: ``mount(app, "/k/voice")``; nginx keeps the prefix, no root path.
- ``/r/``: ``FastAPI(root_path="/r")`` + ``mount(app, "/voice")``; nginx keeps the prefix.

Through each: every route but the health probe answers 401 without the token, the token opens
them, and Twilio's signature validates against the public URL (not uvicorn's own). A sixth
location serves an app without a token: through a proxy it refuses everything but health.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support_served import LiveServer, backend_of, served_runtime
from tests.support_voice import free_port
from tests.test_telephony import TwilioClient
from voicebot.server import create_app, mount
from voicebot.settings import Settings
from voicebot.telephony import SignatureChecker

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TOKEN = "proxy-test-token"
TWILIO = "proxy-twilio-secret"

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists(), reason="needs Debian's nginx (apt-get install nginx; see .ci/run)"
)


class Nginx:
    """nginx in the foreground, one process, its own prefix and config, on a loopback port."""

    def __init__(self, prefix: Path, upstreams: dict[str, tuple[int, bool]]) -> None:
        self.port = free_port()
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        locations = []
        for location, (port, strip) in upstreams.items():
            target = f"http://127.0.0.1:{port}" + ("/" if strip else "")
            locations.append(
                f"""
        location /{location}/ {{
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
        }}"""
            )
        temp = {name: prefix / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        config = f"""
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{self.port};
        {"".join(locations)}
    }}
}}
"""
        self.config = prefix / "nginx.conf"
        self.config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        check = subprocess.run(
            [
                NGINX,
                "-t",
                "-p",
                str(self.prefix),
                "-e",
                str(self.prefix / "error.log"),
                "-c",
                str(self.config),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(self.prefix),
                "-e",
                str(self.prefix / "error.log"),
                "-c",
                str(self.config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.prefix / "error.log").read_text()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.1)
        raise TimeoutError("nginx did not listen")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Deployment:
    name: str
    app: Any
    public_prefix: str
    """Where the agent's routes are, as the outside sees them."""
    root_path: str = ""
    strip: bool = True


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(data_dir=tmp_path, api_token=TOKEN, twilio_auth_token=TWILIO, **extra)


def _deployments(tmp_path: Path) -> list[Deployment]:
    runtime = served_runtime()
    backend = backend_of(runtime)
    settings = _settings(tmp_path)
    mounted = FastAPI()
    mount(mounted, "/voice", settings=settings, backend=backend)
    kept = FastAPI()
    mount(kept, "/k/voice", settings=settings, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastAPI deprecates root_path=; people still use it
        rooted = FastAPI(root_path="/r")
    mount(rooted, "/voice", settings=settings, backend=backend)
    return [
        Deployment("a", create_app(settings, backend=backend), "/a", root_path="/a"),
        Deployment("m", mounted, "/m/voice", root_path="/m"),
        Deployment("k", kept, "/k/voice", strip=False),
        Deployment("r", rooted, "/r/voice", strip=False),
    ]


@contextlib.contextmanager
def _served(deployments: list[Deployment], prefix: Path) -> Iterator[tuple[Nginx, list[Any]]]:
    with contextlib.ExitStack() as stack:
        lives = [stack.enter_context(LiveServer(d.app, root_path=d.root_path)) for d in deployments]
        upstreams = {
            d.name: (live.port, d.strip) for d, live in zip(deployments, lives, strict=True)
        }
        proxy = stack.enter_context(Nginx(prefix, upstreams))
        yield proxy, lives


PROTECTED_GETS = [
    "/api/personas",
    "/api/conversations",
    f"/api/conversations/{uuid.UUID(int=1)}",
    f"/api/conversations/{uuid.UUID(int=1)}/events",
    "/api/calls/nope/events",
    "/metrics",
]


def test_behind_nginx_every_route_needs_the_token_and_twilio_signs_the_public_url(
    tmp_path: Path,
) -> None:
    deployments = _deployments(tmp_path)
    checker = SignatureChecker(TWILIO)
    with _served(deployments, tmp_path / "nginx") as (proxy, lives):
        public = f"https://127.0.0.1:{proxy.port}"  # what the proxy tells the app
        with httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=30) as http:
            for d, live in zip(deployments, lives, strict=True):
                p = d.public_prefix
                assert http.get(f"{p}/healthz").status_code == 200, d.name
                for path in PROTECTED_GETS:
                    assert http.get(p + path).status_code == 401, (d.name, path)
                    assert http.get(p + path, params={"token": "wrong"}).status_code == 401
                auth = {"Authorization": f"Bearer {TOKEN}"}
                assert http.get(f"{p}/api/personas", headers=auth).status_code == 200, d.name
                offer = {"sdp": "v=0", "type": "offer", "webrtc_id": "x"}
                assert http.post(f"{p}/webrtc/offer", json=offer).status_code == 401, d.name
                # Twilio signs the URL it called: the public one, https, with every prefix
                form = {"CallSid": f"CA{d.name}", "From": "+15550000001", "To": "+15550000002"}
                internal = f"http://127.0.0.1:{live.port}{p}/telephone/incoming"
                wrong = {"X-Twilio-Signature": checker.sign(internal, form)}
                assert (
                    http.post(f"{p}/telephone/incoming", data=form, headers=wrong).status_code
                    == 403
                )
                signed = {
                    "X-Twilio-Signature": checker.sign(f"{public}{p}/telephone/incoming", form)
                }
                answered = http.post(f"{p}/telephone/incoming", data=form, headers=signed)
                assert answered.status_code == 200, (d.name, answered.text)
                stream_url = f"wss://127.0.0.1:{proxy.port}{p}/telephone/handler"
                assert f'<Stream url="{stream_url}"' in answered.text, (d.name, answered.text)
                ticket = re.search(r'name="ticket" value="([^"]+)"', answered.text)
                assert ticket is not None

                async def sockets(
                    p: str = p,
                    stream_url: str = stream_url,
                    t: str = ticket[1],
                    sid: str = form["CallSid"],
                ) -> None:
                    ws_base = f"ws://127.0.0.1:{proxy.port}{p}"
                    with pytest.raises(InvalidStatus) as denied:
                        async with connect(f"{ws_base}/websocket/offer"):
                            pass
                    assert denied.value.response.status_code == 401
                    # the media stream: signed over the public wss URL, with its ticket
                    headers = {"X-Twilio-Signature": checker.sign(stream_url, {})}
                    async with TwilioClient(
                        f"{ws_base}/telephone/handler",
                        headers=headers,
                        parameters={"ticket": t},
                        call_sid=sid,
                    ) as caller:
                        assert await caller.wait_for(lambda: caller.heard.media_frames > 5, 10)
                        await caller.stop()
                    internal_ws = stream_url.replace("wss://", "ws://")
                    with pytest.raises(InvalidStatus):
                        headers = {"X-Twilio-Signature": checker.sign(internal_ws, {})}
                        async with connect(
                            f"{ws_base}/telephone/handler", additional_headers=headers
                        ):
                            pass

                asyncio.run(asyncio.wait_for(sockets(), 60))


def test_behind_a_proxy_without_a_token_only_health_answers(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path), backend=backend_of(served_runtime()))
    deployment = Deployment("open", app, "/open", root_path="/open")
    with _served([deployment], tmp_path / "nginx") as (proxy, lives):
        base = f"http://127.0.0.1:{proxy.port}/open"
        assert httpx.get(f"{base}/healthz").status_code == 200
        for path in PROTECTED_GETS:
            reply = httpx.get(base + path)
            assert reply.status_code == 403, path
            assert "VOICEBOT_API_TOKEN" in reply.json()["detail"]
        # the same app, straight on loopback, answers
        assert httpx.get(f"{lives[0].http}/api/personas").status_code == 200
