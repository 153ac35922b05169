"""Character error rate of whisper on the Japanese items of a bench corpus (docs/japanese.md).

python scripts/ja_cer.py [--corpus bench/corpus] [--model DIR]   (default: whisper base)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import soundfile

from voicebot.bench.metrics import error_count
from voicebot.bench.models import base_multilingual_model
from voicebot.stt import WhisperTranscriber


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
        count = error_count(item["text"], heard, "ja")  # the bench's CER
        errors += count.errors
        total += count.length
        print(f"{count.errors:3d}/{count.length:3d}  {item['text']}  ->  {heard}")
    print(f"CER {errors / max(total, 1):.1%} ({errors}/{total} characters), STT {seconds:.1f} s")


if __name__ == "__main__":
    main()
