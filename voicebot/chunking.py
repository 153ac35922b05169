"""Streamed LLM tokens → speakable chunks for TTS (pure: no I/O).

A chunk ends at a sentence end (``. ! ?`` followed by a space, ``。！？`` at once, ``…``,
a newline). The first chunk may end earlier, at a clause boundary, so the first audio
comes sooner; a chunk that grows too long is forced to end at a clause boundary so TTS
never gets a huge input. Chunks are cleaned of markdown, emoji and URLs before they leave.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["Chunker", "chunk_text", "clean_for_speech", "default_first_chunk_chars"]

# Japanese: 8 lets the usual openers (かしこまりました、 / 承知いたしました、 / 恐れ入りますが、)
# go to TTS alone, about 0.7 s sooner than waiting for the sentence (docs/japanese.md), while
# a bare はい、 or そうですね、 still waits for more.
_FIRST_MIN_CHARS = {"en": 24, "ja": 8}
_MAX_CHARS = {"en": 220, "ja": 80}

_SENT_IMMEDIATE = "。！？"
_SENT_SPACED = ".!?…"
# Absorbed into the chunk right after a sentence end: 'He said "Stop." Then' cuts after '"'.
_CLOSERS = "\"'”’)]）】」』"
_CLAUSE_IMMEDIATE = "、，；"
_CLAUSE_SPACED = ",;:"
_OPEN_QUOTES = "「『"
_CLOSE_QUOTES = "」』"
_KANJI_DIGITS = "〇一二三四五六七八九十百千万億"

# "Mr. Smith": a period after these never ends a sentence.
_NEVER_FINAL = frozenset(
    {"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "e.g.", "i.e.", "prof.", "jr.", "sr.", "u.s."}
)
# "at 7 p.m. See you" ends a sentence, "at 7 p.m. on Monday" does not: look at the next word.
_FINAL_IF_CAPITAL = frozenset({"etc.", "a.m.", "p.m."})
_WORD_BEFORE = re.compile(r"[A-Za-z.]*$")
_LIST_MARKER = re.compile(r"^\s*\d+$")


def _language(language: str) -> Literal["en", "ja"]:
    return "ja" if language.lower().startswith("ja") else "en"


def default_first_chunk_chars(language: str) -> int:
    """The first chunk's minimum length in ``language`` when nothing is known of the pace
    (``voicebot.pace`` may lower it)."""
    return _FIRST_MIN_CHARS[_language(language)]


def _is_digit(ch: str) -> bool:
    return ch.isdigit() or ch in _KANJI_DIGITS


def _is_cjk(ch: str) -> bool:
    # Hiragana, katakana, CJK ideographs, full-width forms: Japanese puts no space after ! or ?
    return "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" or "\uff01" <= ch <= "\uff9f"


@dataclass(frozen=True, slots=True)
class _Cut:
    end: int
    kind: Literal["sentence", "clause"]
    in_quote: bool


class Chunker:
    """Turns streamed LLM tokens into speakable chunks.

    ``feed`` returns the chunks a token completed; ``flush`` returns the tail at the end
    of the stream. Chunks are cleaned for speech and never empty.
    """

    def __init__(
        self,
        *,
        first_chunk_min_chars: int | None = None,
        language: str = "en",
        max_chars: int | None = None,
    ) -> None:
        lang = _language(language)
        self.language = lang
        self.first_chunk_min_chars = (
            _FIRST_MIN_CHARS[lang] if first_chunk_min_chars is None else first_chunk_min_chars
        )
        self.max_chars = _MAX_CHARS[lang] if max_chars is None else max_chars
        self._buf = ""
        self._first_pending = True

    def feed(self, token: str) -> list[str]:
        """Add one token; return the chunks it completed."""
        self._buf += token
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of stream: return whatever is left, split as needed."""
        out = self._drain(final=True)
        tail, self._buf = self._buf, ""
        self._emit(tail, out)
        self._first_pending = True
        return out

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            end = self._next_cut(self._buf, final=final)
            if end is None:
                break
            raw, self._buf = self._buf[:end], self._buf[end:].lstrip()
            self._emit(raw, out)
        return out

    def _emit(self, raw: str, out: list[str]) -> None:
        text = clean_for_speech(raw)
        # Punctuation left alone ("！" after "えっ！" was already sent) is nothing to say.
        if any(ch.isalnum() for ch in text):
            out.append(text)
            self._first_pending = False

    def _next_cut(self, buf: str, *, final: bool) -> int | None:
        cuts = _scan(buf, final=final)
        last = cuts[-1] if cuts else None
        sentence = last if last and last.kind == "sentence" and not last.in_quote else None
        sentence_end = sentence.end if sentence else None
        if self._first_pending:
            for cut in cuts:
                if (
                    cut.kind == "clause"
                    and not cut.in_quote
                    and len(clean_for_speech(buf[: cut.end])) >= self.first_chunk_min_chars
                ):
                    return cut.end
        limit = self.max_chars
        if sentence_end is not None and sentence_end <= limit:
            return sentence_end
        if sentence_end is None and len(buf) <= limit:
            return None
        # Too long: force a split, preferring the fullest chunk within the limit; quotes
        # and the sentence rule give way here.
        within = [c.end for c in cuts if c.end <= limit]
        if within:
            return max(within)
        beyond = [c.end for c in cuts if c.end > limit]
        if beyond:
            return min(beyond)
        if len(buf) > limit * 3 // 2:
            return self._hard_cut(buf, limit)
        return None

    def _hard_cut(self, buf: str, limit: int) -> int:
        """A cut with no punctuation at all: at a space (en) or between non-digits (ja)."""
        space = buf.rfind(" ", 0, limit + 1)
        if space > 0:
            return space + 1
        end = limit
        # Never between a number and its counter (3名, 七時).
        while end > 1 and (_is_digit(buf[end - 1]) or _is_digit(buf[end])):
            end -= 1
        return end


def _scan(buf: str, *, final: bool) -> list[_Cut]:
    """Candidate cuts in ``buf``, up to the first sentence end outside quotes (last item).

    Stops early where the next token is needed to decide ("3." could become "3.14").
    """
    cuts: list[_Cut] = []
    depth = 0
    n = len(buf)
    i = 0
    while i < n:
        ch = buf[i]
        if ch == "\n":
            cuts.append(_Cut(i + 1, "sentence", False))
            return cuts
        if ch in _OPEN_QUOTES:
            depth += 1
        elif ch in _CLOSE_QUOTES:
            depth = max(0, depth - 1)
        elif ch in _SENT_IMMEDIATE:
            if depth:
                cuts.append(_Cut(i + 1, "sentence", True))
            else:
                end = _absorb(buf, i + 1, _SENT_IMMEDIATE + _SENT_SPACED + _CLOSERS)
                cuts.append(_Cut(end, "sentence", False))
                return cuts
        elif ch in _SENT_SPACED:
            j = _absorb(buf, i + 1, _SENT_SPACED)
            run = buf[i:j]
            j = _absorb(buf, j, _CLOSERS)
            if j == n and not final:
                return cuts  # wait: "3." may become "3.14", "Dr." may be followed by " Smith"
            verdict = _sentence_end(buf, i, j, run, final=final)
            if verdict is None:
                return cuts
            if verdict:
                if depth:
                    cuts.append(_Cut(j, "sentence", True))
                else:
                    cuts.append(_Cut(j, "sentence", False))
                    return cuts
            i = j
            continue
        elif ch in _CLAUSE_IMMEDIATE:
            nxt = buf[i + 1] if i + 1 < n else ""
            # "1、2名": an enumeration of numbers is not a clause boundary.
            if not (i > 0 and _is_digit(buf[i - 1]) and (nxt == "" or _is_digit(nxt))):
                cuts.append(_Cut(i + 1, "clause", depth > 0))
        elif ch in _CLAUSE_SPACED or (ch == "—" and i > 0 and buf[i - 1] == " "):
            if i + 1 < n and buf[i + 1].isspace():
                cuts.append(_Cut(i + 1, "clause", depth > 0))
        i += 1
    if final and n:
        cuts.append(_Cut(n, "sentence", False))
    return cuts


def _absorb(buf: str, j: int, chars: str) -> int:
    while j < len(buf) and buf[j] in chars:
        j += 1
    return j


def _sentence_end(buf: str, i: int, j: int, run: str, *, final: bool) -> bool | None:
    """Whether the punctuation run ``buf[i:j]`` ends a sentence; None = need more text."""
    n = len(buf)
    ellipsis = "…" in run or run.startswith("..")
    if j == n:
        return True  # final: end of stream
    nxt = buf[j]
    if not nxt.isspace():
        # "3.14", "e.g": no. Japanese puts no space after "!?" or "…".
        return (_is_cjk(nxt) and run != ".") or ("…" in run and not nxt.islower())
    k = j
    while k < n and buf[k].isspace():
        k += 1
    following = buf[k] if k < n else ""
    if ellipsis:
        if not following:
            return True if final else None
        return not following.islower()  # "well... maybe" goes on
    if run != ".":
        return True
    match = _WORD_BEFORE.search(buf[:i])
    word = (match.group(0) if match else "") + "."
    line = buf[:i].rsplit("\n", 1)[-1]
    if word.lower() in _NEVER_FINAL or re.fullmatch(r"[A-Z]\.", word) or _LIST_MARKER.match(line):
        return False
    if word.lower() in _FINAL_IF_CAPITAL:
        if not following:
            return True if final else None
        return following.isupper()
    return True


# A sentence's own period or comma after a URL stays.
_URL = re.compile(r"(?:https?://|www\.)[^\s)\]>]*[^\s)\]>.,!?;:]", re.IGNORECASE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_FENCE = re.compile(r"```[\w+-]*")
_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+", re.MULTILINE)
_QUOTE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.MULTILINE)
_BULLET = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+", re.MULTILINE)
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)_{1,2}([^_\n]+?)_{1,2}(?!\w)")
_STRIKE = re.compile(r"~~(.+?)~~")
_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # pictographs, emoticons, transport, flags, skin tones
    "\u2600-\u27bf"  # misc symbols, dingbats
    "\u2b00-\u2bff"  # arrows and stars (⭐)
    "\u2300-\u23ff"  # technical (⌚ ⏰)
    "\ufe0f\ufe0e\u200d\u20e3"  # variation selectors, zero-width joiner, keycap
    "]+"
)
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" +(?=[.,!?;:。、！？])")


def clean_for_speech(text: str) -> str:
    """Strip markdown, emoji and URLs, and collapse whitespace: what is left is to be read."""
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _FENCE.sub("", text)
    text = _HEADING.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BULLET.sub("", text)
    text = _STRIKE.sub(r"\1", text)
    text = _UNDERSCORE_EMPHASIS.sub(r"\1", text)
    # Asterisks and backticks are never read aloud; a chunk may hold just one half of a pair.
    text = text.replace("*", "").replace("`", "")
    # Table cells: "| a | b |" reads as "a b"; a "|---|" rule leaves nothing to say.
    text = text.replace("|", " ")
    text = _EMOJI.sub("", text)
    text = _SPACES.sub(" ", text).strip()
    # A removed URL or emoji leaves "or ." behind.
    return _SPACE_BEFORE_PUNCT.sub("", text)


def chunk_text(tokens: Iterable[str], language: str = "en", **kw: int | None) -> Iterator[str]:
    """Chunk a whole token stream lazily (convenience over ``Chunker``)."""
    chunker = Chunker(language=language, **kw)
    for token in tokens:
        yield from chunker.feed(token)
    yield from chunker.flush()
