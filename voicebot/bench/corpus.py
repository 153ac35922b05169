"""The benchmark corpus: WAV files plus ``manifest.jsonl``, and the script that generates it.

A manifest line is ``{"audio": "a.wav", "text": "expected transcript", "language": "en"}``,
optionally with ``"barge_in": "stop.wav"`` (an utterance the caller says over the agent's
reply, about a second after it starts) and ``"barge_in_text"``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voicebot.audio import MonoAudio, Samples, resample, to_int16, to_mono_float32
from voicebot.errors import ConfigError

logger = logging.getLogger(__name__)

CORPUS_RATE = 16000
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class CorpusItem:
    """One utterance of the corpus, loaded as 16 kHz mono float32."""

    name: str
    text: str
    language: str
    audio: Samples
    barge_in: Samples | None = None
    barge_in_text: str | None = None

    @property
    def duration_s(self) -> float:
        """Length of the utterance file, padding included."""
        return self.audio.size / CORPUS_RATE


def _read_wav(path: Path) -> Samples:
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot read corpus audio {path}: {e}") from e
    mono_rate, mono = to_mono_float32((int(rate), samples))
    return resample(mono, mono_rate, CORPUS_RATE)


def load_corpus(
    directory: Path, *, languages: Iterable[str] | None = None, limit: int | None = None
) -> list[CorpusItem]:
    """Items of ``directory/manifest.jsonl`` in file order, filtered by language.

    ``limit`` keeps the first N items of each language.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            f"no {MANIFEST} in {directory}: pass --corpus DIR, or generate the default corpus "
            "with `python scripts/make_corpus.py`"
        )
    wanted = {lang.strip() for lang in languages} if languages is not None else None
    items: list[CorpusItem] = []
    per_language: dict[str, int] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            audio_name, text = str(entry["audio"]), str(entry["text"])
            language = str(entry.get("language", "en"))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{manifest}:{number}: not a manifest line ({e})") from e
        if wanted is not None and language not in wanted:
            continue
        if limit is not None and per_language.get(language, 0) >= limit:
            continue
        per_language[language] = per_language.get(language, 0) + 1
        barge = entry.get("barge_in")
        items.append(
            CorpusItem(
                name=Path(audio_name).stem,
                text=text,
                language=language,
                audio=_read_wav(directory / audio_name),
                barge_in=_read_wav(directory / str(barge)) if barge else None,
                barge_in_text=entry.get("barge_in_text"),
            )
        )
    if not items:
        raise ConfigError(f"no corpus items in {manifest} for languages {sorted(wanted or [])}")
    return items


# --- generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UtteranceSpec:
    """What to synthesize for one corpus item."""

    name: str
    text: str
    language: str
    lead_s: float = 0.5
    """Silence before the speech: a caller's line is open before they talk."""
    tail_s: float = 0.8
    """Silence after it; the harness keeps sending silence after the file anyway."""
    barge_in: str | None = None
    """Name of the interruption utterance (another spec) said over the reply."""


INTERRUPT_EN = UtteranceSpec(
    "interrupt_en", "Wait, sorry, let me stop you there.", "en", lead_s=0.0, tail_s=0.3
)
INTERRUPT_JA = UtteranceSpec(
    "interrupt_ja", "すみません、ちょっと待ってください。", "ja", lead_s=0.0, tail_s=0.3
)

# Words only (no digits or symbols), so the word error rate measures recognition, not
# number formatting. Lengths run from about 1 s to 12 s of speech.
DEFAULT_UTTERANCES: tuple[UtteranceSpec, ...] = (
    UtteranceSpec("en01", "Hello there.", "en"),
    UtteranceSpec("en02", "What time is it?", "en"),
    UtteranceSpec("en03", "Can you help me with something?", "en", barge_in="interrupt_en"),
    UtteranceSpec("en04", "I would like to book a table for dinner tonight.", "en"),
    UtteranceSpec(
        "en05",
        "What is the weather going to be like tomorrow morning in Boston?",
        "en",
        barge_in="interrupt_en",
    ),
    UtteranceSpec(
        "en06", "My flight was cancelled and I need another way to get to Chicago.", "en"
    ),
    UtteranceSpec(
        "en07",
        "Could you tell me a little about the history of the city, and what I should see first?",
        "en",
        barge_in="interrupt_en",
    ),
    UtteranceSpec(
        "en08",
        "Please remind me to call my sister on Sunday afternoon, and also to buy some flowers "
        "for her birthday.",
        "en",
    ),
    UtteranceSpec(
        "en09",
        "I have been thinking about learning to play the piano. Do you think it is too late to "
        "start as an adult, and how much should I practice every week?",
        "en",
        barge_in="interrupt_en",
    ),
    UtteranceSpec(
        "en10",
        "We are planning a trip to the mountains next month with the children. What should we "
        "pack, and are there any easy walks that are good for small kids?",
        "en",
    ),
    UtteranceSpec(
        "en11",
        "I bought a new phone last week, but the battery runs out before the end of the day. "
        "I already turned down the screen brightness and closed the apps I do not use. What "
        "else can I try?",
        "en",
    ),
    UtteranceSpec(
        "en12",
        "My neighbor keeps parking his car in front of my driveway in the morning, so I cannot "
        "get out to go to work. I asked him politely twice, but nothing has changed. How should "
        "I handle this without starting a fight?",
        "en",
    ),
    UtteranceSpec("ja01", "こんにちは。", "ja"),
    UtteranceSpec("ja02", "予約をお願いします。", "ja"),
    UtteranceSpec("ja03", "今日の夜は空いていますか。", "ja", barge_in="interrupt_ja"),
    UtteranceSpec("ja04", "駅からお店までの行き方を教えてください。", "ja"),
    UtteranceSpec(
        "ja05", "誕生日のお祝いなので、窓際の席をお願いできますか。", "ja", barge_in="interrupt_ja"
    ),
    UtteranceSpec("ja06", "すみません、子供が一人いるのですが、子供用の椅子はありますか。", "ja"),
    UtteranceSpec(
        "ja07",
        "来週の土曜日に家族で伺いたいのですが、駐車場があるかどうか教えていただけますか。",
        "ja",
    ),
    UtteranceSpec(
        "ja08",
        "卵のアレルギーがある人がいるので、卵を使わない料理があるか知りたいです。"
        "それから、予約の時間を少し遅くすることはできますか。",
        "ja",
    ),
)

Speak = Callable[[str], MonoAudio]
"""Text to ``(rate, float32 samples)`` for one language."""


def render(spec: UtteranceSpec, speak: Speak) -> Samples:
    """The utterance at 16 kHz, with its silence padding."""
    rate, samples = speak(spec.text)
    speech = resample(np.asarray(samples, np.float32), rate, CORPUS_RATE)
    lead = np.zeros(int(spec.lead_s * CORPUS_RATE), np.float32)
    tail = np.zeros(int(spec.tail_s * CORPUS_RATE), np.float32)
    return np.concatenate([lead, speech, tail])


def generate_corpus(
    directory: Path,
    speakers: dict[str, Speak],
    specs: Sequence[UtteranceSpec] = DEFAULT_UTTERANCES,
) -> list[Path]:
    """Write the WAVs and ``manifest.jsonl`` for the specs whose language has a speaker.

    Interruption utterances named by ``barge_in`` are written beside them.
    """
    import soundfile

    interruptions = {s.name: s for s in (INTERRUPT_EN, INTERRUPT_JA)}
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines: list[str] = []
    done: set[str] = set()

    def write(spec: UtteranceSpec) -> str:
        file_name = f"{spec.name}.wav"
        if spec.name not in done:
            samples = render(spec, speakers[spec.language])
            path = directory / file_name
            soundfile.write(str(path), to_int16(samples), CORPUS_RATE, subtype="PCM_16")
            written.append(path)
            done.add(spec.name)
            logger.info("%s: %.1f s", file_name, samples.size / CORPUS_RATE)
        return file_name

    for spec in specs:
        if spec.language not in speakers:
            continue
        entry: dict[str, str] = {"audio": write(spec), "text": spec.text, "language": spec.language}
        if spec.barge_in is not None:
            interruption = interruptions[spec.barge_in]
            entry["barge_in"] = write(interruption)
            entry["barge_in_text"] = interruption.text
        lines.append(json.dumps(entry, ensure_ascii=False))
    manifest = directory / MANIFEST
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(manifest)
    return written
