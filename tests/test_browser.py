"""The Gradio page in headless Chromium: pick a persona, start the stream, hear the greeting,
talk, watch the status line, read the transcript and the latency chart, then open a past
conversation from the log. Chromium's fake microphone plays a WAV file in a loop.

Real models (tiny.en, piper joe), the LLM through the Ollama-protocol server, and the turn log
in the real embedded PostgreSQL.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile

from tests.support_voice import KeywordScript, Timeline, free_port, joe, say
from voicebot.app import build_page, build_runtime, build_stream
from voicebot.conversation import Conversation, Timings, Turn
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.settings import Settings
from voicebot.store import PostgresTurnStore

CHROMIUM = Path("/usr/bin/chromium")
ANSWER = "Paris is the capital of France."
HELPER_MODEL = "helper-model:1b"
PAST_QUESTION = "Which wine goes with trout?"
PAST_ANSWER = "A dry white, such as a Riesling."

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


def _past_conversation(store: PostgresTurnStore) -> Conversation:
    past = Conversation(uuid.uuid4(), "helper-en", "web")
    store.open_conversation(past)
    store.record(
        Turn(
            past.conversation_id,
            1,
            PAST_QUESTION,
            PAST_ANSWER,
            timings=Timings(endpoint_ms=320, stt_ms=400, llm_ttft_ms=150, tts_first_ms=90),
        )
    )
    assert store.flush(10)
    return past


@pytest.fixture(scope="module")
def page_url(
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pg_dsn: str,
) -> Iterator[tuple[str, OllamaProtocolServer, Conversation]]:
    tmp = tmp_path_factory.mktemp("browser")
    with (
        OllamaProtocolServer("gpu-8b", script=KeywordScript([("france", ANSWER)])) as ollama,
        PostgresTurnStore(pg_dsn, tmp / "spool.jsonl") as store,
    ):
        past = _past_conversation(store)
        settings = Settings(
            data_dir=tmp / "data",
            personas_dir=_personas(tmp / "personas"),
            persona="assistant-en",
            stt_model=str(tiny_en_model_dir),
            tts_voice=str(joe_voice_path),
            ollama_host=ollama.base_url,
        )
        runtime = build_runtime(settings, store=store)
        page = build_page(build_stream(runtime, settings), runtime)
        port = free_port()
        page.launch(
            server_name="127.0.0.1",
            server_port=port,
            prevent_thread_lock=True,
            quiet=True,
            show_api=False,
        )
        try:
            yield f"http://127.0.0.1:{port}", ollama, past
        finally:
            page.close()


def test_the_page_greets_answers_shows_status_captions_latencies_and_the_log(
    page_url: tuple[str, OllamaProtocolServer, Conversation], joe_voice_path: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, ollama, past = page_url
    greeting = tomllib.loads((Settings().personas_dir / "assistant-en.toml").read_text())[
        "greeting"
    ]
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
            status = page.locator("#vb-status .vb-status")
            expect(status).to_have_attribute("data-state", "idle", timeout=30_000)
            # Every state the status line goes through, as the page shows it.
            page.evaluate(
                """() => {
                    window.vbStates = [];
                    const seen = () => {
                        const line = document.querySelector('#vb-status .vb-status');
                        const state = line && line.dataset.state;
                        if (state && window.vbStates.at(-1) !== state) window.vbStates.push(state);
                    };
                    new MutationObserver(seen).observe(
                        document.querySelector('#vb-status'),
                        {subtree: true, childList: true, attributes: true, characterData: true});
                }"""
            )
            page.get_by_label("Persona").click()
            page.get_by_role("option", name="Helper").click()
            page.get_by_role("button", name="Click to Access Microphone").click()
            start = page.locator('button[aria-label="start stream"]')
            start.click()
            expect(start).to_have_text("Stop", timeout=30_000)  # connected

            # The greeting is the first bubble, before the caller says anything.
            transcript = page.locator("#vb-transcript")
            users = transcript.locator('[data-testid="user"]')
            bots = transcript.locator('[data-testid="bot"]')
            # (on a busy machine the caller may cut it short: its first words are there)
            expect(bots.first).to_contain_text(greeting.split(".")[0], timeout=30_000)
            # Chromium's file loops, so the caller asks twice: both turns stay on the page.
            rows = page.locator("#vb-latency table tbody tr")
            expect(rows).to_have_count(2, timeout=60_000)
            expect(users).to_have_count(2)
            expect(bots).to_have_count(3)
            assert "capital" in users.first.inner_text().lower()
            assert bots.nth(1).inner_text().strip() == ANSWER
            cells = rows.first.locator("td").all_inner_texts()
            assert cells[0].strip() == "1"
            assert cells[5].strip().isdigit()  # voice-to-voice was measured (ms)
            assert cells[6].strip() == cells[5].strip()  # first sound: no acknowledgement here
            # One stacked bar per turn, its parts drawn.
            bars = page.locator("#vb-latency .vb-chart-row")
            expect(bars).to_have_count(2)
            assert bars.first.locator(".vb-seg").count() >= 3
            assert bars.first.locator(".vb-seg.vb-stt").bounding_box()["width"] > 0
            states = page.evaluate("window.vbStates")
            assert "listening" in states and "speaking" in states[states.index("listening") :]
            assert "thinking" in states, states

            start.click()  # hang up: the log is read between calls
            expect(start).not_to_have_text("Stop", timeout=15_000)

            # The log: pick the past conversation, read it, continue it.
            page.locator("#vb-log").get_by_text("Conversation log").click()
            page.get_by_role("button", name="Refresh").click()
            page.get_by_text(str(past.conversation_id)).first.click()
            expect(page.get_by_text(PAST_ANSWER).first).to_be_visible(timeout=15_000)
            page.locator("#vb-continue").click()
            expect(page.get_by_label("Continue conversation (id, optional)")).to_have_value(
                str(past.conversation_id), timeout=15_000
            )
            expect(transcript.get_by_text(PAST_QUESTION)).to_be_visible()
        finally:
            browser.close()
    # The persona picked on the page is the one that answered.
    assert {r.model for r in ollama.chat_requests() if r.messages} == {HELPER_MODEL}
