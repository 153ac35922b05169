"""What the real server logs, at INFO and at DEBUG: never the token, never what the caller said.

Each test runs ``voicebot`` as a subprocess (its own logging set-up, uvicorn's loggers, Gradio's),
makes the requests a user would (``?token=`` on a websocket and on the page, a call with a
barge-in), and then reads every line the process wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

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
from voicebot.server.access import RedactTokenFilter, install_log_redaction, redact
from voicebot.settings import Settings
from voicebot.telephony import ulaw_encode

TOKEN = "tok-" + secrets.token_urlsafe(18)
QUESTION = "What is the capital of France?"
INTERRUPTION = "Stop, that is enough."
STORY = (
    "Let me tell you a long story about an old lighthouse keeper. He lived alone on a small "
    "island far from the coast. Every evening he climbed the stairs and lit the great lamp. "
    "Ships passed safely through the dark and stormy nights."
)


# --- units ------------------------------------------------------------------------------------


def test_redact_masks_query_tokens_bearer_credentials_and_secrets() -> None:
    line = f'127.0.0.1:5 - "WebSocket /websocket/offer?token={TOKEN}&x=1" [accepted]'
    assert TOKEN not in redact(line) and "x=1" in redact(line)
    assert TOKEN not in redact(f"Authorization: Bearer {TOKEN}")
    assert TOKEN not in redact(f"cookie voicebot_token={TOKEN}")
    assert TOKEN not in redact(f"anything {TOKEN} anywhere", [TOKEN])


def test_redaction_covers_every_logger_and_handler(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction([TOKEN])
    install_log_redaction([TOKEN])  # idempotent
    caplog.set_level(logging.DEBUG)
    # the console may have quieted these loggers (another test ran the CLI in this process)
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    caplog.set_level(logging.DEBUG, logger="some.library")
    logging.getLogger("uvicorn.error").info(
        '%s - "WebSocket %s" [accepted]', "127.0.0.1:1", f"/websocket/offer?token={TOKEN}"
    )
    logging.getLogger("some.library").debug("headers: %r", {"authorization": f"Bearer {TOKEN}"})
    try:
        raise RuntimeError(f"bad url /x?token={TOKEN}")
    except RuntimeError:
        logging.getLogger("voicebot.anything").exception("failed")
    text = caplog.text
    assert "[accepted]" in text and "headers" in text and "RuntimeError" in text
    assert TOKEN not in text
    record = logging.LogRecord("x", logging.INFO, "f", 1, "q %s", (f"?token={TOKEN}",), None)
    RedactTokenFilter().filter(record)
    assert TOKEN not in record.getMessage()


# --- the real server --------------------------------------------------------------------------


class Process:
    """``voicebot ARGS`` with every line it writes kept in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        self._file = log.open("w")
        self.proc = subprocess.Popen(
            [*voicebot_command(), *args],
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_until_up(self, url: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url, timeout=2)
                return
            time.sleep(0.3)
        raise TimeoutError(self.log())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._file.close()
        return self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaProtocolServer]:
    script = KeywordScript([("france", STORY), ("story", STORY)], default="Okay.")
    with OllamaProtocolServer("gpu-8b", script=script) as server:
        yield server


def _one_persona(tmp_path: Path) -> Path:
    personas = tmp_path / "personas"  # one persona: fewer models to load
    personas.mkdir()
    shutil.copy(Settings().personas_dir / "assistant-en.toml", personas)
    return personas


def _models(
    tiny_en_model_dir: Path, joe_voice_path: Path, ollama: OllamaProtocolServer
) -> list[str]:
    return [
        "--stt-model",
        str(tiny_en_model_dir),
        "--tts-voice",
        str(joe_voice_path),
        "--ollama-host",
        ollama.base_url,
    ]


def _frames(samples16k: np.ndarray) -> list[str]:
    """20 ms websocket ``media`` payloads: μ-law of 16 kHz samples (FastRTC's websocket takes
    the handler's input rate)."""
    import base64

    pcm = (np.clip(samples16k, -1, 1) * 32767).astype(np.int16)
    return [
        base64.b64encode(ulaw_encode(pcm[i : i + 320])).decode() for i in range(0, pcm.size, 320)
    ]


async def _websocket_call(
    port: int, question: np.ndarray, interruption: np.ndarray
) -> tuple[int, int]:
    """Greeting, a question, and a barge-in over the spoken answer; returns the media frames
    heard before and after the question."""
    url = f"ws://127.0.0.1:{port}/websocket/offer?token={TOKEN}"
    silence = np.zeros(320, np.float32)
    heard = [0]
    last = [time.monotonic()]
    async with connect(url, max_size=None) as ws:

        async def read() -> None:
            async for message in ws:
                if json.loads(message).get("event") == "media":
                    heard[0] += 1
                    last[0] = time.monotonic()

        reader = asyncio.create_task(read())

        async def send(payloads: list[str]) -> None:
            for payload in payloads:
                await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
                await asyncio.sleep(0.02)

        async def quiet_until(done: object, timeout_s: float) -> bool:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if callable(done) and done():
                    return True
                await send(_frames(silence))
            return False

        await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
        # the greeting plays: wait until it has been quiet for a second
        await quiet_until(lambda: heard[0] > 0 and time.monotonic() - last[0] > 1.0, 30)
        before = heard[0]
        await send(_frames(question))
        # the answer starts playing: talk over it
        assert await quiet_until(lambda: heard[0] > before, 30), "no answer heard"
        await quiet_until(lambda: False, 0.5)
        await send(_frames(interruption))
        await quiet_until(lambda: False, 6.0)
        await ws.send(json.dumps({"event": "stop"}))
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
    return before, heard[0]


@pytest.mark.parametrize("level", ["info"])  # at DEBUG: the ui test below (same serving path)
def test_serve_logs_neither_the_token_nor_what_the_caller_said(
    level: str,
    ollama: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    voice = joe(joe_voice_path)

    def at_16k(text: str) -> np.ndarray:
        rate, samples = say(voice, text)
        return resample(samples.astype(np.float32), rate, 16000)

    question, interruption = at_16k(QUESTION), at_16k(INTERRUPTION)
    env = subprocess_env(
        tmp_path / "data",
        VOICEBOT_API_TOKEN=TOKEN,
        VOICEBOT_DATABASE_URL=pg_dsn,
        VOICEBOT_PERSONAS_DIR=str(_one_persona(tmp_path)),
    )
    server = Process(
        [
            "--log-level",
            level,
            "serve",
            "--no-ui",
            "--verbose",  # every library's lines too: uvicorn's websocket line must be masked
            "--port",
            str(port),
            *_models(tiny_en_model_dir, joe_voice_path, ollama),
        ],
        tmp_path / "serve.log",
        env,
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        server.wait_until_up(f"http://127.0.0.1:{port}/healthz")
        before, after = asyncio.run(_websocket_call(port, question, interruption))
        assert after > before
        # what the caller said reached the turn log: it was heard, and the log is checked for it
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=30) as http:
            texts: list[str] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(texts) < 2:  # both turns, or 20 s
                listed = http.get("/api/conversations", params={"limit": 5}).json()
                texts = []
                for conversation in listed:
                    detail = http.get(f"/api/conversations/{conversation['id']}").json()
                    texts += [t["user_text"] for t in detail["turns"] if t["user_text"]]
                time.sleep(0.5)
            assert http.get("/metrics", params={"token": TOKEN}).status_code == 200
    finally:
        log = server.stop()
    assert any("capital" in t.lower() for t in texts), (texts, log[-3000:])
    # The barge-in is what logged the caller's words before ("barge-in (said '...')"); on a
    # loaded machine its own turn may still be in flight when the call stops, so it is not
    # required to be stored, only never logged.
    assert "started with persona" in log  # the level's lines were written
    assert "[accepted]" in log and "token=***" in log  # uvicorn's websocket line, masked
    assert TOKEN not in log
    lowered = log.lower()
    for text in texts:
        assert repr(text).lower() not in lowered, text  # how a log line would quote it
        words = re.sub(r"[^\w\s]", "", text.lower()).strip()
        if len(words.split()) < 2:
            continue  # "Stop." alone also spells an LLM's done_reason=stop: checked below
        assert text.lower() not in lowered and words not in lowered, text
    for word in ("capital of france", "that is enough"):
        assert word not in lowered


@pytest.mark.parametrize("level", ["debug"])  # at INFO, with a call: tests/test_drain.py
def test_ui_logs_no_token_and_guards_its_page(
    level: str,
    ollama: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = subprocess_env(
        tmp_path / "data",
        VOICEBOT_API_TOKEN=TOKEN,
        VOICEBOT_PERSONAS_DIR=str(_one_persona(tmp_path)),
    )
    page = Process(
        [
            "--log-level",
            level,
            "ui",
            "--no-store",
            "--port",
            str(port),
            *_models(tiny_en_model_dir, joe_voice_path, ollama),
        ],
        tmp_path / "ui.log",
        env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        page.wait_until_up(f"{base}/")
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/").status_code == 401
            assert http.get("/gradio_api/info").status_code == 401
            assert http.get("/", params={"token": "wrong"}).status_code == 401
            visit = http.get("/", params={"token": TOKEN})
            assert visit.status_code == 200
            assert "voicebot_token" in visit.headers.get("set-cookie", "")
            assert http.get("/gradio_api/info").status_code == 200  # the cookie carries it
        with httpx.Client(base_url=base, timeout=30) as http:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            assert http.get("/gradio_api/info", headers=bearer).status_code == 200
    finally:
        log = page.stop()
    assert "listening on" in log
    assert TOKEN not in log


def test_ui_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from voicebot.cli import app as cli

    result = CliRunner().invoke(
        cli,
        ["ui", "--host", "0.0.0.0"],
        env={"VOICEBOT_DATA_DIR": str(tmp_path), "VOICEBOT_API_TOKEN": ""},
    )
    assert result.exit_code == 2
    assert "VOICEBOT_API_TOKEN" in result.output
