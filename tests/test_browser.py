"""The Gradio page in headless Chromium: pick a persona, start the stream, talk, read the
transcript and the latency table. Chromium's fake microphone plays a WAV file in a loop.

Real models (tiny.en, piper joe) and the LLM through the Ollama-protocol server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile

from tests.support_voice import KeywordScript, Timeline, free_port, joe, say
from voicebot.app import build_runtime, build_stream
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
ANSWER = "Paris is the capital of France."
HELPER_MODEL = "helper-model:1b"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


def _personas(target: Path) -> Path:
    """assistant-en plus a second English persona with its own LLM model, to pick in the UI."""
    target.mkdir()
    source = (Settings().personas_dir / "assistant-en.toml").read_text(encoding="utf-8")
    (target / "assistant-en.toml").write_text(source, encoding="utf-8")
    helper = source.replace('name = "assistant-en"', 'name = "helper-en"', 1)
    helper = helper.replace('display_name = "Assistant (English)"', 'display_name = "Helper"', 1)
    helper = helper.replace('llm_model = "llama3.2:3b"', f'llm_model = "{HELPER_MODEL}"', 1)
    assert 'name = "helper-en"' in helper and HELPER_MODEL in helper and '"Helper"' in helper
    (target / "helper-en.toml").write_text(helper, encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def page_url(
    tiny_en_model_dir: Path, joe_voice_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, OllamaProtocolServer]]:
    tmp = tmp_path_factory.mktemp("browser")
    with OllamaProtocolServer("gpu-8b", script=KeywordScript([("france", ANSWER)])) as ollama:
        settings = Settings(
            data_dir=tmp / "data",
            personas_dir=_personas(tmp / "personas"),
            persona="assistant-en",
            stt_model=str(tiny_en_model_dir),
            tts_voice=str(joe_voice_path),
            ollama_host=ollama.base_url,
        )
        runtime = build_runtime(settings)
        stream = build_stream(runtime, settings)
        port = free_port()
        stream.ui.launch(
            server_name="127.0.0.1",
            server_port=port,
            prevent_thread_lock=True,
            quiet=True,
            show_api=False,
        )
        try:
            yield f"http://127.0.0.1:{port}", ollama
        finally:
            stream.ui.close()


def test_the_page_answers_a_caller_and_shows_transcript_and_latencies(
    page_url: tuple[str, OllamaProtocolServer], joe_voice_path: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, ollama = page_url
    voice = joe(joe_voice_path)
    # Long enough a lead-in for the greeting to end; Chromium loops the file.
    mic = (
        Timeline(voice.sample_rate)
        .silence(4.5)
        .clip(say(voice, "What is the capital of France?"))
        .silence(6.0)
    )
    wav = tmp_path / "mic.wav"
    soundfile.write(wav, mic.audio[1], mic.rate, subtype="PCM_16")
    blocked: list[str] = []

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith((url, "data:", "blob:")):
            route.continue_()
        else:  # fonts, CDN scripts, sound cues: the page must work without them
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            page = browser.new_page()
            page.route("**/*", only_loopback)
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_label("Persona").click()
            page.get_by_role("option", name="Helper").click()
            page.get_by_role("button", name="Click to Access Microphone").click()
            start = page.locator('button[aria-label="start stream"]')
            start.click()
            expect(start).to_have_text("Stop", timeout=30_000)  # connected

            # Chromium's file loops, so the caller asks twice: both turns stay on the page.
            users = page.locator('[data-testid="user"]')
            bots = page.locator('[data-testid="bot"]')
            rows = page.locator('[data-testid="markdown"] table tbody tr')
            expect(rows).to_have_count(2, timeout=60_000)
            expect(users).to_have_count(2)
            expect(bots).to_have_count(2)
            assert "capital" in users.first.inner_text().lower()
            assert bots.first.inner_text().strip() == ANSWER
            cells = rows.first.locator("td").all_inner_texts()
            assert cells[0].strip() == "1"
            assert cells[5].strip().endswith("ms")  # voice-to-voice was measured
        finally:
            browser.close()
    # The persona picked on the page is the one that answered.
    assert {r.model for r in ollama.chat_requests() if r.messages} == {HELPER_MODEL}
