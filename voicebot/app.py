"""Composition root: the only place that builds real models, clients and the FastRTC stream."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voicebot.errors import ConfigError, StageError, VoicebotError
from voicebot.personas import Persona, load_personas
from voicebot.runtime import PersonaStack, Runtime
from voicebot.settings import Settings
from voicebot.turns import TurnConfig

if TYPE_CHECKING:
    from voicebot.reservations.book import ReservationBook
    from voicebot.store import TurnStore

logger = logging.getLogger(__name__)


def turn_config(settings: Settings) -> TurnConfig:
    """The turn-taking parameters from the settings."""
    return TurnConfig(
        threshold=settings.vad_threshold,
        min_speech_ms=settings.min_speech_ms,
        end_silence_ms=settings.end_silence_ms,
        pre_roll_ms=settings.pre_roll_ms,
        max_utterance_s=settings.max_utterance_s,
        bargein_min_speech_ms=settings.bargein_min_speech_ms,
        backchannel_max_ms=settings.backchannel_max_ms,
    )


def select_personas(settings: Settings, names: Iterable[str] | None) -> dict[str, Persona]:
    """The personas to load: the named ones (default persona first), or all of them."""
    personas = load_personas(settings.personas_dir)
    wanted = list(names) if names is not None else list(personas)
    if settings.persona not in wanted:
        wanted.insert(0, settings.persona)
    missing = [n for n in wanted if n not in personas]
    if missing:
        raise ConfigError(
            f"unknown persona {', '.join(missing)}: choose one of {', '.join(sorted(personas))} "
            f"(files in {settings.personas_dir})"
        )
    return {name: personas[name] for name in wanted}


def build_runtime(
    settings: Settings,
    *,
    personas: Iterable[str] | None = None,
    store: TurnStore | None = None,
    reservations: ReservationBook | None = None,
    warm_up: bool = True,
) -> Runtime:
    """Load every model the selected personas need, once, and warm them up in parallel.

    ``reservations``: the process's reservation book (one per process, see
    ``open_persistence``); None without a database, and the reservation tools say so."""
    from voicebot.llm import OllamaChat, make_client
    from voicebot.stt import WhisperTranscriber, default_model_name, resolve_device
    from voicebot.tts import VoiceBank
    from voicebot.vad import SileroVad

    started = time.monotonic()
    selected = select_personas(settings, personas)
    device, _ = resolve_device(settings.device)
    vad = SileroVad()
    transcribers: dict[str, WhisperTranscriber] = {}
    voices = VoiceBank(settings.voices_dir, settings.cache_dir)
    client = make_client(
        settings.ollama_host,
        timeout_s=settings.llm_timeout_s,
        connect_timeout_s=settings.llm_connect_timeout_s,
    )
    stacks: dict[str, PersonaStack] = {}
    for name, persona in selected.items():
        model = settings.stt_model or default_model_name(device, persona.language)
        if model not in transcribers:
            transcribers[model] = WhisperTranscriber(
                model,
                device=settings.device,
                compute_type=settings.stt_compute_type,
                cpu_threads=settings.stt_cpu_threads,
            )
        voice = persona.tts_voice
        if settings.tts_voice and persona.tts == "piper":
            voice = settings.tts_voice
        stacks[name] = PersonaStack(
            persona=persona,
            transcriber=transcribers[model],
            chat=OllamaChat(
                client,
                persona.llm_model,
                options=persona.sampling.as_options(),
                keep_alive=settings.llm_keep_alive,
            ),
            synthesizer=voices.get(persona.tts, voice),
        )
    if warm_up:
        _warm_up(stacks.values())
    logger.info(
        "models ready in %.1f s: stt %s; personas %s",
        time.monotonic() - started,
        ", ".join(transcribers),
        ", ".join(stacks),
    )
    return Runtime(
        vad=vad,
        stacks=stacks,
        turn_config=turn_config(settings),
        default_persona=settings.persona,
        store=store,
        reservations=reservations,
    )


def _warm_up(stacks: Iterable[PersonaStack]) -> None:
    """Run one tiny request through each model so the first call does not pay for loading."""
    tasks: dict[int, Any] = {}
    for stack in stacks:
        for part in (stack.transcriber, stack.synthesizer, stack.chat):
            warm = getattr(part, "warm_up", None)
            if warm is not None:
                tasks.setdefault(id(part), warm)
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="warm-up") as pool:
        futures = [pool.submit(task) for task in tasks.values()]
        for future in futures:
            try:
                future.result()
            except StageError as e:
                # Ollama may come up later; the call apologizes until then and doctor says why.
                logger.warning("warm-up: %s", e)


@dataclass(frozen=True)
class Persistence:
    """What the database gives one process: the turn log and the reservation book."""

    store: TurnStore
    reservations: ReservationBook


@contextlib.contextmanager
def open_persistence(settings: Settings) -> Iterator[Persistence]:
    """Start (or reach) PostgreSQL, a write-behind turn store and the reservation book (its
    own small pool, shared by every call of the process); close both on exit."""
    from voicebot.database import open_database
    from voicebot.reservations.book import ReservationBook
    from voicebot.store import PostgresTurnStore

    with open_database(settings) as database:
        logger.info("turn log in %s", database.display_dsn)
        store = PostgresTurnStore(
            database.dsn, settings.spool_path, settings.store_queue_size
        ).start()
        try:
            with ReservationBook.connect(database.dsn) as book:
                yield Persistence(store, book)
        finally:
            store.close()


@contextlib.contextmanager
def open_turn_store(settings: Settings) -> Iterator[TurnStore]:
    """Start (or reach) PostgreSQL and a write-behind turn store; drain and stop on exit."""
    with open_persistence(settings) as persistence:
        yield persistence.store


def build_stream(runtime: Runtime, settings: Settings) -> Any:
    """The FastRTC stream with its Gradio page: persona picker, audio, transcript, latencies,
    and (with a turn log) the recent conversations, one of which a call may continue."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from voicebot.handler import VoiceHandler
    from voicebot.ui import build_call_stream

    return build_call_stream(
        VoiceHandler(runtime, channel="web", persona_from_ui=True),
        [(stack.persona.display_name, name) for name, stack in runtime.stacks.items()],
        runtime.default_persona,
        concurrency_limit=settings.concurrency_limit,
        time_limit=settings.time_limit_s,
    )


def build_page(stream: Any, runtime: Runtime) -> Any:
    """The page to serve: the stream's UI, plus the conversation log when there is one."""
    import gradio as gr

    from voicebot.ui import ConversationLog, add_conversation_log

    store = runtime.store
    if store is None or not hasattr(store, "conversations"):
        return stream.ui
    log: ConversationLog = store  # type: ignore[assignment]
    conversation_box = stream.additional_input_components[1]
    with gr.Blocks(title="voicebot", analytics_enabled=False) as page:
        stream.ui.render()
        add_conversation_log(log, conversation_box)
    return page


def launch_ui(settings: Settings, runtime: Runtime) -> Any:
    """Start serving the Gradio page and return it once it answers (``block_thread()`` waits)."""
    page = build_page(build_stream(runtime, settings), runtime)
    page.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,
        show_api=False,
        quiet=True,
        prevent_thread_lock=True,
    )
    return page


__all__ = [
    "ConfigError",
    "VoicebotError",
    "build_page",
    "build_runtime",
    "build_stream",
    "launch_ui",
    "turn_config",
]
