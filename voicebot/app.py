"""Composition root: the only place that builds real models, clients and the FastRTC stream."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voicebot.console import step
from voicebot.errors import ConfigError, StageError, VoicebotError
from voicebot.pace import ReplyPace
from voicebot.personas import Persona, load_personas
from voicebot.runtime import PersonaStack, Runtime
from voicebot.settings import Settings
from voicebot.turns import TurnConfig

if TYPE_CHECKING:
    import ollama

    from voicebot.llm import ChatModel
    from voicebot.reservations.book import ReservationBook
    from voicebot.store import PostgresTurnStore, TurnStore

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
        preemptive_replies=settings.preemptive_replies,
        stt_drafts=settings.stt_draft,
        complete_silence_ms=settings.complete_silence_ms,
        incomplete_silence_ms=settings.incomplete_silence_ms,
        turn_end_threshold=settings.turn_end_threshold,
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


PullOffer = Callable[["ollama.Client", str], bool]
"""Asked when a persona's model is not pulled: pull it (True when it now is)."""


def build_runtime(
    settings: Settings,
    *,
    personas: Iterable[str] | None = None,
    store: TurnStore | None = None,
    reservations: ReservationBook | None = None,
    warm_up: bool = True,
    offer_pull: PullOffer | None = None,
) -> Runtime:
    """Load every model the selected personas need, once, check the LLMs and warm everything
    up in parallel; each step is one line on ``voicebot.startup``.

    ``reservations``: the process's reservation book (one per process, see
    ``open_persistence``); None without a database, and the reservation tools say so."""
    from voicebot.cpu import available_cores, thread_plan
    from voicebot.stt import WhisperTranscriber, default_model_name, resolve_device
    from voicebot.tts import VoiceBank
    from voicebot.vad import SileroVad

    started = time.monotonic()
    selected = select_personas(settings, personas)
    device, _ = resolve_device(settings.device)
    loading = time.monotonic()
    vad = SileroVad()
    step("  VAD       Silero v6, loaded in %.1f s", time.monotonic() - loading)
    transcribers: dict[str, WhisperTranscriber] = {}
    plan = thread_plan(
        available_cores(),
        stt_workers=settings.stt_workers,
        stt_threads=settings.stt_cpu_threads,
        tts_threads=settings.tts_threads,
    )
    voices = VoiceBank(settings.voices_dir, settings.cache_dir, threads=plan.tts_threads)
    loaded_voices: set[tuple[str, str]] = set()
    chats = ChatFactory(settings)
    stacks: dict[str, PersonaStack] = {}
    for name, persona in selected.items():
        model = settings.stt_model or default_model_name(device, persona.language)
        if model not in transcribers:
            loading = time.monotonic()
            stt = transcribers[model] = WhisperTranscriber(
                model,
                device=settings.device,
                compute_type=settings.stt_compute_type,
                cpu_threads=plan.stt_threads,
                num_workers=plan.stt_workers,
                short_window=settings.stt_short_window,
            )
            step(
                "  STT       whisper %s on %s/%s, loaded in %.1f s",
                stt.name,
                stt.device,
                stt.compute_type,
                time.monotonic() - loading,
            )
        voice = persona.tts_voice
        if settings.tts_voice and persona.tts == "piper":
            voice = settings.tts_voice
        loading = time.monotonic()
        synthesizer = voices.get(persona.tts, voice)
        if (persona.tts, voice) not in loaded_voices:
            loaded_voices.add((persona.tts, voice))
            step(
                "  TTS       %s, loaded in %.1f s",
                synthesizer.name,
                time.monotonic() - loading,
            )
        stacks[name] = PersonaStack(
            persona=persona,
            transcriber=transcribers[model],
            chat=chats.chat_for(persona),
            synthesizer=synthesizer,
            pace=ReplyPace(adaptive=settings.first_chunk_paced),
        )
    if warm_up:
        reachable = _check_llms(settings.ollama_host, stacks.values(), offer_pull)
        warming = time.monotonic()
        _warm_up(stacks.values(), reachable)
        step("  warm-up   every model ran once in %.1f s", time.monotonic() - warming)
    logger.info(
        "models ready in %.1f s: stt %s; personas %s",
        time.monotonic() - started,
        ", ".join(transcribers),
        ", ".join(stacks),
    )
    from voicebot.endpointing import load_turn_end_model

    turn_end = load_turn_end_model(settings.turn_end_model, settings.cache_dir)
    return Runtime(
        vad=vad,
        stacks=stacks,
        turn_config=turn_config(settings),
        default_persona=settings.persona,
        store=store,
        turn_end=turn_end,
        turn_end_executor=(
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="turn-end") if turn_end else None
        ),
        reservations=reservations,
    )


class ChatFactory:
    """The chat model of each persona, on the backend it names (or the setting's), with one
    client per backend."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ollama: Any = None
        self._openai: Any = None

    def backend_of(self, persona: Persona) -> str:
        return persona.llm_backend or self.settings.llm_backend

    def chat_for(self, persona: Persona) -> ChatModel:
        settings = self.settings
        if self.backend_of(persona) == "openai":
            from voicebot.llm_openai import OpenAIChat, make_openai_client, openai_options

            if self._openai is None:
                key = settings.openai_api_key
                self._openai = make_openai_client(
                    settings.openai_base_url,
                    api_key=key.get_secret_value() if key else None,
                    timeout_s=settings.llm_timeout_s,
                    connect_timeout_s=settings.llm_connect_timeout_s,
                )
            options = openai_options(persona.sampling.as_options())
            return OpenAIChat(self._openai, persona.llm_model, options=options)
        from voicebot.llm import OllamaChat, make_client

        if self._ollama is None:
            self._ollama = make_client(
                settings.ollama_host,
                timeout_s=settings.llm_timeout_s,
                connect_timeout_s=settings.llm_connect_timeout_s,
            )
        return OllamaChat(
            self._ollama,
            persona.llm_model,
            options=persona.sampling.as_options(),
            keep_alive=settings.llm_keep_alive,
        )


def _check_llms(
    host: str, stacks: Iterable[PersonaStack], offer_pull: PullOffer | None
) -> set[int]:
    """One line per LLM model: reachable and pulled, or the command that fixes it. An Ollama
    that cannot be reached is said once, not once per model. Returns the ``id`` of each chat
    model worth warming up."""
    from voicebot.llm import OllamaChat

    usable: set[int] = set()
    pulled: dict[str, bool] = {}
    for stack in stacks:
        chat = stack.chat
        if not isinstance(chat, OllamaChat):
            usable.add(id(chat))
            continue
        if chat.name not in pulled:
            try:
                chat.check()
                pulled[chat.name] = True
            except ConfigError as e:
                if "ollama pull" not in str(e):  # unreachable: the other models would agree
                    step("  LLM       %s; until then the persona apologizes", e)
                    return usable
                pulled[chat.name] = offer_pull is not None and offer_pull(chat.client, chat.name)
                if not pulled[chat.name]:
                    step("  LLM       %s; until then the persona apologizes", e)
            if pulled[chat.name]:
                step("  LLM       %s at %s: reachable, model pulled", chat.name, host)
        if pulled[chat.name]:
            usable.add(id(chat))
    return usable


def _warm_up(stacks: Iterable[PersonaStack], reachable_chats: set[int] | None = None) -> None:
    """Run one tiny request through each model so the first call does not pay for loading."""
    from voicebot.call.playout import OUTPUT_RATE

    tasks: dict[int, Any] = {}
    for stack in stacks:
        parts: list[Any] = [stack.transcriber, stack.synthesizer]
        if reachable_chats is None or id(stack.chat) in reachable_chats:
            parts.append(stack.chat)
        for part in parts:
            warm = getattr(part, "warm_up", None)
            if warm is not None:
                tasks.setdefault(id(part), warm)
        if stack.persona.acknowledgement:  # made once here, then every call shares it
            tasks.setdefault(
                id(stack.acknowledgement),
                functools.partial(
                    stack.acknowledgement.get,
                    stack.persona.acknowledgement,
                    stack.synthesizer,
                    OUTPUT_RATE,
                ),
            )
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

    store: PostgresTurnStore
    reservations: ReservationBook


@contextlib.contextmanager
def open_persistence(settings: Settings) -> Iterator[Persistence]:
    """Start (or reach) PostgreSQL, a write-behind turn store and the reservation book (its
    own small pool, shared by every call of the process); close both on exit.

    An external server that is unreachable now does not stop us: the store spools, then
    connects, migrates and replays once it is back (``voicebot.database``)."""
    from voicebot.database import open_database
    from voicebot.reservations.book import ReservationBook
    from voicebot.store import PostgresTurnStore

    started = time.monotonic()
    with open_database(settings, allow_unreachable=True) as database:
        step("  database  %s, ready in %.1f s", database.display_dsn, time.monotonic() - started)
        store = PostgresTurnStore(
            database.dsn,
            settings.spool_path,
            settings.store_queue_size,
            prepare=database.ensure_ready,
            database_name=f"PostgreSQL at {database.display_dsn}",
            known_down=not database.ready,
        ).start()
        try:
            with ReservationBook.connect(database.dsn) as book:
                yield Persistence(store, book)
        finally:
            store.close()


@contextlib.contextmanager
def open_turn_store(settings: Settings) -> Iterator[PostgresTurnStore]:
    """Start (or reach) PostgreSQL and a write-behind turn store; drain and stop on exit."""
    with open_persistence(settings) as persistence:
        yield persistence.store


def build_stream(runtime: Runtime, settings: Settings) -> Any:
    """A FastRTC stream with its Gradio page around an already loaded ``runtime``, without the
    serving path's lines, drain or resume rule: for tests and scripts that drive the page's
    parts directly. ``voicebot ui`` and ``serve`` build theirs in ``voicebot.server.app``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from voicebot.handler import VoiceHandler
    from voicebot.ui import build_call_stream

    return build_call_stream(
        VoiceHandler(runtime, channel="web", persona_from_ui=True),
        [(stack.persona.display_name, name) for name, stack in runtime.stacks.items()],
        runtime.default_persona,
        concurrency_limit=settings.concurrency_limit,
        time_limit=settings.time_limit_s,
        rtc_configuration=settings.rtc_configuration.as_dict()
        if settings.rtc_configuration
        else None,
        languages={name: stack.persona.language for name, stack in runtime.stacks.items()},
    )


def build_page(stream: Any, runtime: Runtime) -> Any:
    """``build_stream``'s page, plus the conversation log when the runtime's store has one."""
    from voicebot.ui import ConversationLog
    from voicebot.ui import build_page as page_of

    store = runtime.store
    if store is None or not hasattr(store, "conversations"):
        return stream.ui
    log: ConversationLog = store  # type: ignore[assignment]
    return page_of(stream, log, list(runtime.stacks))


__all__ = [
    "ConfigError",
    "VoicebotError",
    "build_page",
    "build_runtime",
    "build_stream",
    "turn_config",
]
