"""Table tests of the backchannel (aizuchi) decision: whisper's spellings in, a verdict out."""

from __future__ import annotations

import pytest

from voicebot.backchannel import MAX_BACKCHANNEL_S, SHORT_OVERLAP_S, is_backchannel, normalize

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
    # Longer than a short overlap, so that only the phrase lists decide.
    assert not is_backchannel("はい", 0.9, (), "en")
    assert not is_backchannel("Yeah.", 0.9, (), "fr")
    assert not is_backchannel("Yeah.", 0.3, (), "fr")  # no duration rule for unknown languages


# A short overlap: whisper's words are trusted only for a floor-claiming word. Left: what
# whisper wrote for a 0.2-0.7 s clip (the mishearings are real ones, of Kokoro and piper).
SHORT_MISHEARD_AIZUCHI = [
    ("ja", "どうも"),  # ええ
    ("ja", "ウンロンは"),  # うんうん
    ("ja", "よっ"),  # へえ
    ("ja", "気持ちいい?"),  # ええ
    ("ja", "お前は"),  # うんうん
    ("ja", "えー"),
    ("en", "Yummy."),
    ("en", "Come on."),
    ("en", "And I'm"),
    ("en", "I know."),
]

SHORT_INTERRUPTIONS = [
    ("ja", "待って"),
    ("ja", "待って。"),
    ("ja", "まって"),
    ("ja", "いいえ"),
    ("ja", "いいえ。"),
    ("ja", "違います"),
    ("ja", "ちがう"),
    ("ja", "ちょっと"),
    ("ja", "ちょっと。"),
    ("ja", "すみません"),
    ("ja", "すいません"),
    ("ja", "あの"),
    ("ja", "あのー"),
    ("ja", "やめて"),
    ("ja", "ストップ"),
    ("ja", "もう一度"),
    ("ja", "え?"),
    ("ja", "え？"),
    ("ja", "えっ?"),
    ("ja", "エ?"),
    ("en", "Wait."),
    ("en", "Wait!"),
    ("en", "Stop."),
    ("en", "No."),
    ("en", "Nope."),
    ("en", "No, no."),
    ("en", "Hold on."),
    ("en", "Hang on."),
    ("en", "Sorry?"),
    ("en", "Excuse me."),
    ("en", "Actually,"),
    ("en", "What?"),
    ("en", "Pardon?"),
    ("en", "Repeat that."),
    ("en", "But..."),
]

# Whisper heard words: more than a short transcript is judged by its words, whatever the length.
LONG_TRANSCRIPTS = [
    ("ja", "予約をお願いします"),
    ("ja", "三名でお願いします"),
    ("en", "Friday at seven."),
    ("en", "in a moment"),
]


@pytest.mark.parametrize(("language", "text"), SHORT_MISHEARD_AIZUCHI)
def test_short_overlap_without_a_stop_word_is_a_backchannel(language: str, text: str) -> None:
    assert is_backchannel(text, SHORT_OVERLAP_S, (), language)
    assert is_backchannel(text, 0.2, (), language)


@pytest.mark.parametrize(("language", "text"), SHORT_MISHEARD_AIZUCHI)
def test_the_same_words_spoken_longer_stop_the_agent(language: str, text: str) -> None:
    assert not is_backchannel(text, SHORT_OVERLAP_S + 0.05, (), language)


@pytest.mark.parametrize(("language", "text"), SHORT_INTERRUPTIONS)
def test_short_overlap_with_a_stop_word_stops_the_agent(language: str, text: str) -> None:
    assert not is_backchannel(text, 0.2, (), language)
    assert not is_backchannel(text, SHORT_OVERLAP_S, (), language)


@pytest.mark.parametrize(("language", "text"), LONG_TRANSCRIPTS)
def test_short_overlap_with_a_long_transcript_is_judged_by_its_words(
    language: str, text: str
) -> None:
    assert not is_backchannel(text, 0.5, (), language)


@pytest.mark.parametrize(
    ("language", "text"),
    [("ja", "ええ?"), ("ja", "ええ"), ("ja", "はい?"), ("en", "Really?"), ("en", "Okay?")],
)
def test_a_known_aizuchi_said_as_a_question_is_still_one(language: str, text: str) -> None:
    assert is_backchannel(text, 0.5, (), language)


def test_english_stop_words_match_word_starts_not_letters_inside_words() -> None:
    assert not is_backchannel("Nothing.", 0.5, (), "en")  # "no…"
    assert not is_backchannel("Waiter.", 0.5, (), "en")  # "Wait." misheard
    assert is_backchannel("I know.", 0.5, (), "en")  # "know" is not "no"


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
