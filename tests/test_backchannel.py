"""Table tests of the backchannel (aizuchi) decision: whisper's spellings in, a verdict out."""

from __future__ import annotations

import pytest

from voicebot.backchannel import MAX_BACKCHANNEL_S, is_backchannel, normalize

JA_BACKCHANNELS = [
    "はい",
    "はい。",
    "ハイ",
    "ﾊｲ",
    "はーい",
    "はいっ",
    "はいはい",
    "はい、はい。",
    "はいはいはい",
    "うん",
    "うんうん",
    "うんうんうん",
    "ウン。",
    "ええ",
    "ええ。",
    "えええ",
    "ええええ",
    "そうですね",
    "そうですね。",
    "はい、そうですね。",
    "なるほど",
    "なるほど、なるほど",
    "なるほどですね",
    "へえ",
    "へぇ",
    "へー",
    "そうなんですね",
    "そうそう",
    "確かに",
    "たしかに。",
    "ああ、はい",
    "あー、なるほど",
    "はい、わかりました",
    "うん、そっか",
    "ご視聴ありがとうございました",  # whisper's words for a cough
    "",
    "。",
]

JA_INTERRUPTIONS = [
    "すみません",
    "すみません、時間を変えたいんですが",
    "あの、ちょっと待ってください",
    "いいえ",
    "いや、違います",
    "待って",
    "はい、でも三名です",
    "えっと、日付を変更したいです",
    "もう一度お願いします",
    "キャンセルしたいです",
    "え?",
    "はいじゃなくて",
]

EN_BACKCHANNELS = [
    "Uh-huh.",
    "uh huh",
    "Uh-huh, uh-huh.",
    "Mm-hmm.",
    "Mhm.",
    "Mmm.",
    "Hmm.",
    "Yeah.",
    "Yeah, yeah.",
    "yeah yeah yeah",
    "Right.",
    "Right, right.",
    "Okay.",
    "OK.",
    "Oh, okay.",
    "I see.",
    "Oh, I see.",
    "Got it.",
    "Sure.",
    "All right.",
    "Alright.",
    "Yes.",
    "Yep.",
    "Cool.",
    "Wow.",
    "Thank you.",
    "you",  # whisper's word for a breath
    "",
]

EN_INTERRUPTIONS = [
    "Wait.",
    "Wait, actually I want to change the time.",
    "Stop.",
    "No.",
    "No, that's wrong.",
    "Hold on.",
    "Excuse me.",
    "Yeah, but what about Friday?",
    "Okay, wait.",
    "Can you repeat that?",
    "Actually, never mind.",
    "Sorry?",
    "What?",
    "Yesterday.",
]


@pytest.mark.parametrize("text", JA_BACKCHANNELS)
def test_japanese_aizuchi_do_not_stop_the_agent(text: str) -> None:
    assert is_backchannel(text, 0.6, (), "ja")


@pytest.mark.parametrize("text", JA_INTERRUPTIONS)
def test_japanese_interruptions_stop_the_agent(text: str) -> None:
    assert not is_backchannel(text, 0.8, (), "ja")


@pytest.mark.parametrize("text", EN_BACKCHANNELS)
def test_english_backchannels_do_not_stop_the_agent(text: str) -> None:
    assert is_backchannel(text, 0.6, (), "en")


@pytest.mark.parametrize("text", EN_INTERRUPTIONS)
def test_english_interruptions_stop_the_agent(text: str) -> None:
    assert not is_backchannel(text, 0.8, (), "en")


def test_long_speech_is_never_a_backchannel() -> None:
    assert is_backchannel("はいはいはい", MAX_BACKCHANNEL_S, (), "ja")
    assert not is_backchannel("はいはいはい", MAX_BACKCHANNEL_S + 0.1, (), "ja")
    assert not is_backchannel("", MAX_BACKCHANNEL_S + 0.1, (), "en")


def test_persona_phrases_add_to_the_language_defaults() -> None:
    assert not is_backchannel("おっしゃる通り", 0.7, (), "ja")
    assert is_backchannel("おっしゃる通りです", 0.7, ("おっしゃる通り", "です"), "ja")
    assert is_backchannel("はい", 0.3, ("おっしゃる通り",), "ja-JP")
    assert is_backchannel("Indeed, quite so.", 0.9, ("quite so",), "en_US")


def test_one_language_list_does_not_leak_into_the_other() -> None:
    assert not is_backchannel("はい", 0.3, (), "en")
    assert not is_backchannel("Yeah.", 0.3, (), "fr")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("Uh-huh.", "uhuh"),
        ("uh huh", "uhuh"),
        ("Mm-hmm!", "mhm"),
        ("Mhm", "mhm"),
        ("ハイ。", "はい"),
        ("はーい", "はい"),
        ("へぇ", "へえ"),
        ("ええええ", "ええ"),
        ("えー", "え"),
        ("えええ", "ええ"),
        ("ＯＫ", "ok"),
        ("「はい」", "はい"),
    ],
)
def test_normalize(raw: str, canonical: str) -> None:
    assert normalize(raw) == canonical
