"""Character error rate of whisper on the Japanese items of a bench corpus (docs/japanese.md).

python scripts/ja_cer.py [--corpus bench/corpus] [--model DIR]   (default: whisper base)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import unicodedata
from pathlib import Path

import soundfile

from voicebot.bench.models import base_multilingual_model
from voicebot.stt import WhisperTranscriber


def _chars(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if ch.isalnum())


def _distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("bench/corpus"))
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or base_multilingual_model(Path(tempfile.gettempdir()) / "voicebot-aizuchi")
    stt = WhisperTranscriber(str(model), device="cpu")
    errors = total = 0
    seconds = 0.0
    for line in (args.corpus / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        if item.get("language") != "ja":
            continue
        audio, rate = soundfile.read(args.corpus / item["audio"], dtype="float32")
        started = time.perf_counter()
        heard = stt.transcribe((rate, audio), "ja")
        seconds += time.perf_counter() - started
        ref, hyp = _chars(item["text"]), _chars(heard)
        errors += _distance(ref, hyp)
        total += len(ref)
        print(f"{_distance(ref, hyp):3d}/{len(ref):3d}  {item['text']}  ->  {heard}")
    print(f"CER {errors / max(total, 1):.1%} ({errors}/{total} characters), STT {seconds:.1f} s")


if __name__ == "__main__":
    main()
