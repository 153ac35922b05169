"""Chunker: realistic streamed LLM output, tokens split at awkward places, both languages."""

from __future__ import annotations

import pytest

from voicebot.chunking import Chunker, chunk_text, clean_for_speech


def chunks(tokens: list[str], language: str = "en", **kw: int) -> list[str]:
    return list(chunk_text(tokens, language, **kw))


def toks(text: str, size: int = 3) -> list[str]:
    """Split text into fixed-size tokens: cuts land mid-word and mid-punctuation."""
    return [text[i : i + size] for i in range(0, len(text), size)]


# --- English ------------------------------------------------------------------------------

EN_CASES = [
    pytest.param(
        ["Sure", "!", " Pi", " is", " about", " 3", ".", "14", " today", "."],
        ["Sure!", "Pi is about 3.14 today."],
        id="decimal-split-across-tokens",
    ),
    pytest.param(
        ["I", " spoke", " to", " Dr", ".", " Smith", " and", " Mrs", ".", " Lee", ".", " Ok", "."],
        ["I spoke to Dr. Smith and Mrs. Lee.", "Ok."],
        id="titles",
    ),
    pytest.param(
        ["Fruit", ", e", ".g", ". apples", ", i.e", ". tasty", " ones", ". Next", "."],
        ["Fruit, e.g. apples, i.e. tasty ones.", "Next."],
        id="eg-ie",
    ),
    pytest.param(
        ["We", " open", " at", " 7", ":", "30", " a", ".m", ". on", " Mon", ".", " Bye", "."],
        ["We open at 7:30 a.m. on Mon.", "Bye."],
        id="time-am-lowercase-continues",
    ),
    pytest.param(
        ["Dinner", " is", " at", " 11", ":00", " p.m", ". See", " you", "!"],
        ["Dinner is at 11:00 p.m.", "See you!"],
        id="time-pm-capital-ends",
    ),
    pytest.param(
        ["Pens", ", paper", ", etc", ". Then", " go", "."],
        ["Pens, paper, etc.", "Then go."],
        id="etc-capital-ends",
    ),
    pytest.param(
        ["He", " lives", " in", " the", " U", ".S", ". now", ".", " Mr", ". X", " too", "."],
        ["He lives in the U.S. now.", "Mr. X too."],
        id="us-and-st",
    ),
    pytest.param(
        ["Well", "...", " maybe", " not", ".", " Hmm", "...", " Okay", "."],
        ["Well... maybe not.", "Hmm...", "Okay."],
        id="ellipsis",
    ),
    pytest.param(
        ["Wait", "…", "what", "?!", " Really", "?"],
        ["Wait…what?!", "Really?"],
        id="unicode-ellipsis-lowercase-and-runs",
    ),
    pytest.param(
        ["He", " said", ' "', "Stop", '."', " Then", " left", "."],
        ['He said "Stop."', "Then left."],
        id="closing-quote-absorbed",
    ),
    pytest.param(
        ["Line", " one", "\n", "Line", " two", "\n\n", "Three"],
        ["Line one", "Line two", "Three"],
        id="newlines",
    ),
    pytest.param(
        ["Version", " 2", ".", "0", " is", " out", ".", ""],
        ["Version 2.0 is out."],
        id="version-number",
    ),
]


@pytest.mark.parametrize(("tokens", "expected"), EN_CASES)
def test_english_chunks(tokens: list[str], expected: list[str]) -> None:
    assert chunks(tokens) == expected


def test_sentence_end_waits_for_the_next_token() -> None:
    c = Chunker()
    assert c.feed("It is 3") == []
    assert c.feed(".") == []  # could still become 3.14
    assert c.feed("14") == []
    assert c.feed(".") == []
    assert c.feed(" Next") == ["It is 3.14."]
    assert c.flush() == ["Next"]


def test_title_waits_then_continues() -> None:
    c = Chunker()
    assert c.feed("Ask Dr") == []
    assert c.feed(".") == []
    assert c.feed(" ") == []  # "Dr. " never ends a sentence
    assert c.feed("Smith.") == []
    assert c.feed(" ") == ["Ask Dr. Smith."]


def test_flush_emits_pending_sentence_end_and_tail() -> None:
    c = Chunker()
    assert c.feed("The answer is 3.") == []
    assert c.flush() == ["The answer is 3."]
    assert c.flush() == []


def test_flush_without_punctuation() -> None:
    assert chunks(["no", " punctuation", " at", " all"]) == ["no punctuation at all"]


def test_fine_grained_tokens_give_same_chunks() -> None:
    text = (
        "Hi there! Dr. Wu arrives at 7:30 a.m. on the 3.5 km trail. Bring water, snacks, etc. Ok?"
    )
    expected = [
        "Hi there!",
        "Dr. Wu arrives at 7:30 a.m. on the 3.5 km trail.",
        "Bring water, snacks, etc.",
        "Ok?",
    ]
    for size in (1, 2, 3, 5, 7, len(text)):
        assert chunks(toks(text, size)) == expected, size


def test_first_chunk_ends_at_clause_once_long_enough() -> None:
    tokens = toks(
        "Well, the museum you asked about, which opens at nine, is closed today. See you."
    )
    assert chunks(tokens) == [
        "Well, the museum you asked about,",  # "Well," is shorter than 24 chars
        "which opens at nine, is closed today.",  # later chunks end only at sentences
        "See you.",
    ]


def test_first_chunk_clause_rule_semicolon_colon_dash() -> None:
    assert chunks(toks("Here is what I would suggest: take the train; it is fast.")) == [
        "Here is what I would suggest:",
        "take the train; it is fast.",
    ]
    assert chunks(toks("That is a really good question — let me think.")) == [
        "That is a really good question —",
        "let me think.",
    ]


def test_first_chunk_min_chars_is_configurable() -> None:
    text = "Sure, I can help with that. Bye."
    assert chunks(toks(text), first_chunk_min_chars=4) == ["Sure,", "I can help with that.", "Bye."]
    assert chunks(toks(text)) == ["Sure, I can help with that.", "Bye."]


def test_clause_marks_inside_numbers_and_times_do_not_split() -> None:
    text = "The population reached 1,250,000 at 10:45 yesterday, says the report. Ok."
    assert chunks(toks(text, 2)) == [
        "The population reached 1,250,000 at 10:45 yesterday,",
        "says the report.",
        "Ok.",
    ]


def test_long_chunk_is_forced_at_a_clause_boundary() -> None:
    clause = "and then we walked a little further along the river"
    text = ", ".join([clause] * 8) + ". Done."
    out = chunks(toks("Okay. " + text, 4))
    assert out[0] == "Okay."
    assert out[-1] == "Done."
    assert all(len(c) <= 220 for c in out)
    assert len(out) > 3
    assert all(c.endswith((",", ".")) for c in out)
    assert " ".join(out[1:-1]) == text.removesuffix(" Done.")


def test_long_chunk_without_any_punctuation_is_cut_at_a_space() -> None:
    text = " ".join(["word"] * 120)
    out = chunks(toks(text, 5))
    assert all(len(c) <= 220 for c in out)
    assert " ".join(out) == text


def test_max_chars_is_configurable() -> None:
    out = chunks(toks("One, two, three, four, five, six, seven, eight."), max_chars=12)
    assert all(len(c) <= 12 for c in out)
    assert out[-1].endswith("eight.")


def test_numbered_list_and_markdown() -> None:
    tokens = toks(
        "## Plan\nHere are the steps:\n1. Pack **light** bags.\n2. Take the `JR` line.\n"
        "- See [the map](https://example.com/map) 🗺️\n> Enjoy!\n",
        4,
    )
    assert chunks(tokens) == [
        "Plan",
        "Here are the steps:",
        "Pack light bags.",
        "Take the JR line.",
        "See the map",
        "Enjoy!",
    ]


def test_markdown_and_emoji_only_chunks_are_dropped() -> None:
    tokens = ["---", "\n", "😀", "🎉", "\n", "**", "**", "\n", "```", "\n", "Hi", "."]
    assert chunks(tokens) == ["Hi."]
    assert chunks(["👍"]) == []
    assert chunks([]) == []


def test_bold_split_by_first_clause() -> None:
    out = chunks(toks("**Note:** the last train, which is at midnight, is often full. Ok.", 3))
    assert out == ["Note: the last train, which is at midnight,", "is often full.", "Ok."]


def test_url_in_sentence_is_dropped_but_sentence_kept() -> None:
    assert chunks(toks("Visit https://example.com/a.b?c=d for more. Or www.foo.org now.", 4)) == [
        "Visit for more.",
        "Or now.",
    ]


def test_punctuation_only_leftover_is_dropped() -> None:
    assert chunks(["Really", "?", "!", " Yes", "."]) == ["Really?!", "Yes."]


def test_chunker_is_reusable_after_flush() -> None:
    c = Chunker()
    assert c.feed("Well, that was a very long first clause, ") == [
        "Well, that was a very long first clause,"
    ]
    assert c.flush() == []
    # The first-chunk rule applies again to the next stream.
    assert c.feed("And again a very long first clause, yes") == [
        "And again a very long first clause,"
    ]


# --- Japanese -----------------------------------------------------------------------------

JA_CASES = [
    pytest.param(
        ["はい", "。", "かしこ", "まりました", "！", "ご予約", "は", "何名", "様", "ですか", "？"],
        ["はい。", "かしこまりました！", "ご予約は何名様ですか？"],
        id="immediate-sentence-ends",
    ),
    pytest.param(
        ["本日", "は", "晴れ", "です", "。明日", "は雨", "でしょう", "。"],
        ["本日は晴れです。", "明日は雨でしょう。"],
        id="split-inside-token",
    ),
    pytest.param(
        ["彼は", "「こんにちは", "。", "元気", "？」", "と", "言いました", "。", "以上です", "。"],
        ["彼は「こんにちは。元気？」と言いました。", "以上です。"],
        id="quote-kept-whole",
    ),
    pytest.param(
        ["『星の", "王子さま。』", "を読み", "ました", "。"],
        ["『星の王子さま。』を読みました。"],
        id="double-quote-kept-whole",
    ),
    pytest.param(
        ["えっと", "…", "それは", "無理です", "。"],
        ["えっと…", "それは無理です。"],
        id="ellipsis",
    ),
    pytest.param(
        ["本当", "!?", "すごい", "ですね", "。"],
        ["本当!?", "すごいですね。"],
        id="ascii-bang-before-kana",
    ),
    pytest.param(
        ["円周率", "は3", ".", "14", "です", "。"],
        ["円周率は3.14です。"],
        id="decimal",
    ),
    pytest.param(
        ["一行目", "\n", "二行目"],
        ["一行目", "二行目"],
        id="newline-and-flush",
    ),
]


@pytest.mark.parametrize(("tokens", "expected"), JA_CASES)
def test_japanese_chunks(tokens: list[str], expected: list[str]) -> None:
    assert chunks(tokens, "ja") == expected


def test_japanese_sentence_end_is_final_at_once() -> None:
    c = Chunker(language="ja")
    assert c.feed("ありがとう") == []
    assert c.feed("ございます。") == ["ありがとうございます。"]
    assert c.feed("また") == []
    assert c.flush() == ["また"]


def test_japanese_first_chunk_clause_rule() -> None:
    tokens = toks("ご予約の日時を確認しますと、明日の午後7時、大人二名様ですね。承知しました。", 2)
    assert chunks(tokens, "ja") == [
        "ご予約の日時を確認しますと、",  # >= 8 chars: early first chunk
        "明日の午後7時、大人二名様ですね。",  # later chunks: sentence ends only
        "承知しました。",
    ]


def test_japanese_short_clause_does_not_end_first_chunk() -> None:
    assert chunks(toks("はい、承知いたしました。", 2), "ja") == ["はい、承知いたしました。"]


def test_japanese_number_enumeration_not_split() -> None:
    tokens = [
        "お部屋",
        "は",
        "1",
        "、",
        "2",
        "名様",
        "用と",
        "3",
        "、",
        "4名",
        "様用",
        "が",
        "あります。",
    ]
    assert chunks(tokens, "ja", first_chunk_min_chars=1) == [
        "お部屋は1、2名様用と3、4名様用があります。"
    ]


def test_japanese_quote_not_split_at_clause() -> None:
    out = chunks(toks("店員さんが「いらっしゃいませ、何名様ですか」と聞きました。", 2), "ja")
    assert out == ["店員さんが「いらっしゃいませ、何名様ですか」と聞きました。"]


def test_japanese_long_chunk_is_forced() -> None:
    first = "はい。"
    clause = "駅から少し歩いたところにある小さな公園を通り抜けて"
    text = "、".join([clause] * 6) + "到着します。"
    out = chunks(toks(first + text, 3), "ja")
    assert out[0] == "はい。"
    assert all(len(c) <= 80 for c in out)
    assert len(out) > 2
    assert "".join(out[1:]) == text
    assert all(c.endswith(("、", "。")) for c in out)


def test_japanese_long_chunk_without_punctuation_keeps_number_and_counter() -> None:
    text = "あ" * 118 + "12名様" + "い" * 40
    out = chunks([text], "ja")
    assert "".join(out) == text
    assert all(len(c) <= 120 for c in out)
    assert any("12名様" in c for c in out)


def test_japanese_unclosed_quote_is_forced_when_long() -> None:
    text = "「" + "今日はいい天気ですね。" * 12
    out = chunks(toks(text, 4), "ja")
    assert "".join(out) == text
    assert all(len(c) <= 80 for c in out)


def test_japanese_markdown_and_emoji() -> None:
    tokens = toks(
        "## ご案内\n- **営業時間**は10時から19時です😊\n1. 詳細は[こちら](https://x.jp)。\n", 3
    )
    assert chunks(tokens, "ja") == ["ご案内", "営業時間は10時から19時です", "詳細はこちら。"]


def test_language_tags_accept_regions() -> None:
    assert Chunker(language="ja-JP").first_chunk_min_chars == 8
    assert Chunker(language="en-US").max_chars == 220


# --- clean_for_speech ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("**bold** and *em* and __u__ and _v_", "bold and em and u and v"),
        ("use `pip install x` now", "use pip install x now"),
        ("# Title", "Title"),
        ("### Sub title", "Sub title"),
        ("- item one", "item one"),
        ("* item two", "item two"),
        ("  12. twelfth", "twelfth"),
        ("> quoted text", "quoted text"),
        ("see [docs](https://a.b/c) here", "see docs here"),
        ("![a cat](cat.png)", "a cat"),
        ("go to https://example.com/x?y=1 or www.example.org.", "go to or."),
        ("nice 👍🏽 work 🎉 ✨", "nice work"),
        ("family 👨‍👩‍👧 ok", "family ok"),
        ("a\n\n  b\t c", "a b c"),
        ("snake_case_name stays", "snake_case_name stays"),
        ("~~old~~ new", "old new"),
        ("```python", ""),
        ("こんにちは😊！", "こんにちは！"),
        ("3 * 4 = 12", "3 4 = 12"),
        ("| Tokyo | 7 pm |", "Tokyo 7 pm"),
        ("|---|:---:|", "---:---:"),
    ],
)
def test_clean_for_speech(raw: str, clean: str) -> None:
    assert clean_for_speech(raw) == clean


# Realistic reservation replies (streamed two characters at a time, as a Japanese tokenizer
# does): where the first audio can start, and where it must wait.
JA_REPLY_CASES = [
    pytest.param(
        "かしこまりました、それではお名前をお伺いしてもよろしいでしょうか。",
        ["かしこまりました、", "それではお名前をお伺いしてもよろしいでしょうか。"],
        id="opener-clause-goes-first",
    ),
    pytest.param(
        "そうですね、その日は満席です。",
        ["そうですね、その日は満席です。"],
        id="short-clause-waits",
    ),
    pytest.param(
        "承知いたしました、七月十日の午後7時、二名様ですね。ほかにご要望はございますか。",
        ["承知いたしました、", "七月十日の午後7時、二名様ですね。", "ほかにご要望はございますか。"],
        id="later-clauses-stay-in-sentence",
    ),
    pytest.param(
        "ご要望は「窓際の席、静かな所」ですね。かしこまりました。",
        ["ご要望は「窓際の席、静かな所」ですね。", "かしこまりました。"],
        id="quote-whole-even-for-first-chunk",
    ),
    pytest.param(
        "本当ですか！それは良かったです。何時ごろがよろしいですか？",
        ["本当ですか！", "それは良かったです。", "何時ごろがよろしいですか？"],
        id="exclamation-and-question",
    ),
    pytest.param(
        "お席は1、2名様用と3、4名様用がございます。",
        ["お席は1、2名様用と3、4名様用がございます。"],
        id="number-enumeration-is-not-a-clause",
    ),
]


@pytest.mark.parametrize(("reply", "expected"), JA_REPLY_CASES)
def test_japanese_reservation_replies(reply: str, expected: list[str]) -> None:
    for size in (1, 2, 3):
        assert chunks(toks(reply, size), "ja") == expected
