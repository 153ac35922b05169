"""The first chunk's length chosen from the measured paces of the voice and the model
(``voicebot.pace``): the bound itself, and a call whose second reply starts shorter only when
its voice is fast enough, on a virtual clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests import fakes
from tests.fakes import silence, tone
from voicebot.call.clock import VirtualClock
from voicebot.chunking import Chunker, default_first_chunk_chars
from voicebot.pace import MARGIN, MIN_FIRST_CHUNK_CHARS, ReplyPace
from voicebot.simulate import simulate_call


def _measured(*, speech_rate: float, rtf: float, llm_rate: float, chunk: int) -> ReplyPace:
    pace = ReplyPace()
    audio_s = chunk / speech_rate
    pace.synthesized(chunk, audio_s, audio_s * rtf)
    pace.streamed(300, 300 / llm_rate)
    return pace


def test_nothing_measured_keeps_the_languages_default() -> None:
    pace = ReplyPace()
    assert pace.first_chunk_min_chars(24) == 24
    pace.synthesized(3, 0.0, 0.1)  # "…!" gave no audio: no rate to learn from
    assert pace.estimates().speech_rate is None and pace.estimates().rtf is None
    pace.synthesized(60, 4.0, 0.2)  # the voice alone: the model's pace is still unknown
    assert pace.first_chunk_min_chars(24) == 24


def test_the_bound_is_the_next_chunks_synthesis_and_writing_over_the_speaking_rate() -> None:
    # A quiet CPU's piper (15 characters a second, RTF 0.04) and a GPU model (300 a second):
    # the next 60-character chunk is ready 0.36 s after the cut, which 7 characters cover.
    pace = _measured(speech_rate=15.0, rtf=0.04, llm_rate=300.0, chunk=60)
    expected = math.ceil(60 * (15.0 / 300.0 + 0.04) * MARGIN)
    assert expected == 7
    assert pace.first_chunk_min_chars(24) == expected
    chunker = Chunker(first_chunk_min_chars=pace.first_chunk_min_chars(24))
    chunks = [
        c
        for token in "You said: hello there. Tell me more.".split(" ")
        for c in chunker.feed(token + " ")
    ]
    assert chunks[0] == "You said:"


def test_a_slow_model_or_voice_keeps_the_default_and_nothing_goes_below_the_floor() -> None:
    cpu_model = _measured(speech_rate=15.0, rtf=0.04, llm_rate=40.0, chunk=60)
    assert cpu_model.first_chunk_min_chars(24) == 24
    loaded_voice = _measured(speech_rate=15.0, rtf=0.9, llm_rate=300.0, chunk=60)
    assert loaded_voice.first_chunk_min_chars(24) == 24
    instant = _measured(speech_rate=15.0, rtf=0.0, llm_rate=10_000.0, chunk=10)
    assert instant.first_chunk_min_chars(24) == MIN_FIRST_CHUNK_CHARS
    assert ReplyPace(adaptive=False).first_chunk_min_chars(24) == 24
    fixed = _measured(speech_rate=15.0, rtf=0.0, llm_rate=10_000.0, chunk=10)
    fixed.adaptive = False
    assert fixed.first_chunk_min_chars(24) == 24


def test_a_slower_sample_counts_at_once_and_a_faster_one_slowly() -> None:
    pace = _measured(speech_rate=15.0, rtf=0.04, llm_rate=300.0, chunk=60)
    pace.synthesized(60, 4.0, 4.0)  # another call held the voice: RTF 1
    assert pace.estimates().rtf == pytest.approx(1.0)
    assert pace.first_chunk_min_chars(24) == 24
    pace.synthesized(60, 4.0, 0.16)  # quiet again: trusted step by step
    assert 0.04 < (pace.estimates().rtf or 0) < 1.0
    assert pace.first_chunk_min_chars(24) == 24
    pace.streamed(300, 30.0)  # a slow stream: 10 characters a second, taken at once
    assert pace.estimates().llm_rate == pytest.approx(10.0)
    pace.streamed(5, 10.0)  # too short to say anything: ignored
    assert pace.estimates().llm_rate == pytest.approx(10.0)


REPLY = "Well, that is a question I can answer for you. Here is a second sentence to say."


def _two_turns(synthesizer: fakes.ToneSynthesizer) -> list[str]:
    clock = VirtualClock()
    chat = fakes.FakeChat(reply=REPLY)
    rt = fakes.runtime(clock=clock, chat=chat, synthesizer=synthesizer)
    audio = np.concatenate([tone(0.6), silence(6.0), tone(0.6), silence(6.0)])
    result = simulate_call(rt, (16000, audio), clock=clock)
    assert [t.assistant_text for t in result.turns] == [REPLY, REPLY]
    return synthesizer.texts


def test_a_fast_voice_starts_the_next_reply_at_its_first_comma() -> None:
    texts = _two_turns(fakes.ToneSynthesizer())
    # The first reply is cut with the default (no pace measured yet), the second at "Well,".
    assert texts[0] == "Well, that is a question I can answer for you."
    assert texts[2:] == [
        "Well,",
        "that is a question I can answer for you.",
        "Here is a second sentence to say.",
    ]


def test_a_slow_voice_keeps_whole_first_sentences() -> None:
    # Real time on a loaded CPU: the next chunk would come after "Well," had played.
    texts = _two_turns(fakes.ToneSynthesizer(rtf=1.0))
    assert (
        texts
        == [
            "Well, that is a question I can answer for you.",
            "Here is a second sentence to say.",
        ]
        * 2
    )
    assert default_first_chunk_chars("en") == 24
