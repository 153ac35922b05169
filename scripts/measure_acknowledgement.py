"""Does the persona's acknowledgement pay? First sound and voice-to-voice, with and without it.

Each corpus item of one language goes through our pipeline twice, interleaved (with the
acknowledgement, without it), in real time as the bench drives a call (``bench.runner.run_one``:
same models, the in-process Ollama-protocol server, no interruption). Reported: first sound
(speech end to the first agent audio of any kind) and v2v (to the answer's first audio) p50 /
p90, and how many turns played the acknowledgement.

    .venv/bin/python scripts/measure_acknowledgement.py --language ja --after-ms 700,1200
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import warnings

from voicebot.bench.baseline import SileroV6PauseModel
from voicebot.bench.corpus import load_corpus
from voicebot.bench.main import DEFAULT_CORPUS, BenchOptions, _setup
from voicebot.bench.runner import LanguageSetup, Measurement, reference, run_one
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.settings import Settings


def _variant(setup: LanguageSetup, ack: str, after_ms: int) -> LanguageSetup:
    stack = setup.stack
    persona = stack.persona.model_copy(
        update={"acknowledgement": ack, "acknowledge_after_ms": after_ms}
    )
    stacks = dict(setup.runtime.stacks)
    stacks[setup.persona] = dataclasses.replace(stack, persona=persona)
    return LanguageSetup(
        setup.language, dataclasses.replace(setup.runtime, stacks=stacks), setup.persona
    )


def _ready(m: Measurement) -> float | None:
    """When the answer's first audio was ready, from the speech end (the call's own stages)."""
    stages = (m.endpoint_ms, m.stt_ms, m.llm_first_chunk_ms, m.tts_first_ms)
    return None if any(v is None for v in stages) else sum(v or 0.0 for v in stages)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--language", default="ja")
    parser.add_argument("--ack", default="はい、")
    parser.add_argument("--after-ms", default="700", help="One or more, comma-separated.")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--llm-profile", default="gpu-8b")
    parser.add_argument("--max-tail-s", type=float, default=40.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "coroutine 'StreamHandlerBase.send_message'")
    items = load_corpus(DEFAULT_CORPUS, languages=[args.language], limit=args.limit)
    server = OllamaProtocolServer(args.llm_profile)
    host = server.start()
    try:
        base = _setup(args.language, BenchOptions(), Settings(), host)
        variants = {
            f"@{after}": _variant(base, args.ack, int(after)) for after in args.after_ms.split(",")
        }
        variants["without"] = _variant(base, "", 700)
        vad = base.runtime.vad
        pause_model = SileroV6PauseModel(vad)
        refs = {i.name: reference(vad, base.runtime.turn_config, i) for i in items}
        results: dict[str, list[Measurement]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for item in items:
                for name, setup in variants.items():
                    m = run_one(
                        "ours",
                        setup,
                        pause_model,
                        item,
                        refs[item.name],
                        repeat=repeat,
                        interrupt=False,
                        max_tail_s=args.max_tail_s,
                    )
                    results[name].append(m)
                    print(
                        f"{name:8s} {item.name} first sound {m.first_sound_ms} v2v {m.v2v_ms}"
                        f" answer ready {_ready(m)} {' '.join(m.notes)}",
                        flush=True,
                    )
    finally:
        server.stop()
    print(f"\n{args.language}, acknowledgement {args.ack!r} after {args.after_ms} ms")
    for name, ms in results.items():
        first = [m.first_sound_ms for m in ms if m.first_sound_ms is not None]
        v2v = [m.v2v_ms for m in ms if m.v2v_ms is not None]
        acked = sum(
            1
            for m in ms
            if m.first_sound_ms is not None and m.v2v_ms is not None and m.v2v_ms > m.first_sound_ms
        )
        # how long the answer waited after it was ready (the playout's lead, plus the rest of
        # an acknowledgement still playing)
        waited = [
            m.v2v_ms - ready
            for m in ms
            if m.v2v_ms is not None and (ready := _ready(m)) is not None
        ]
        print(
            f"  {name:8s} first sound p50 {statistics.median(first):6.0f} p90 {_p(first, 0.9):6.0f}"
            f"  v2v p50 {statistics.median(v2v):6.0f} p90 {_p(v2v, 0.9):6.0f}"
            f"  answer heard after ready p50 {statistics.median(waited):5.0f}"
            f"  acknowledged {acked}/{len(ms)}"
        )


if __name__ == "__main__":
    main()
