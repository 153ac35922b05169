"""The ``voicebot`` command line: ui, simulate, doctor, and the tools built on them."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from voicebot.console import fail, setup_logging, step
from voicebot.errors import ConfigError, VoicebotError
from voicebot.reservations.cli import register as _register_reservations
from voicebot.settings import Settings

app = typer.Typer(
    help="voicebot: a local, real-time voice agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("voicebot")

Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass(frozen=True)
class ModelOptions:
    """The option block of every command that loads models (one definition: ``models``)."""

    persona: Annotated[
        str | None, typer.Option("--persona", help="Persona name (a file in personas/).")
    ] = None
    stt_model: Annotated[
        str | None,
        typer.Option(
            "--stt-model", help="faster-whisper size name or local CTranslate2 directory."
        ),
    ] = None
    tts_voice: Annotated[
        str | None,
        typer.Option(
            "--tts-voice", help="Piper voice name or local .onnx path (overrides persona)."
        ),
    ] = None
    ollama_host: Annotated[
        str | None, typer.Option("--ollama-host", help="Ollama base URL (default $OLLAMA_HOST).")
    ] = None
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu or cuda: where STT runs.")
    ] = None
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Every library's log lines and each start-up detail."),
    ] = False

    def settings(self, **more: Any) -> Settings:
        """Settings from the environment with these flags (and ``more``) on top."""
        return make_settings(
            persona=self.persona,
            stt_model=self.stt_model,
            tts_voice=self.tts_voice,
            ollama_host=self.ollama_host,
            device=self.device,
            **more,
        )


def models(*, without: tuple[str, ...] = ()) -> Callable[[Command], Command]:
    """Give a command the shared model options; it receives them as ``options: ModelOptions``.

    ``without`` leaves out options a command has no use for (``bench`` has no persona).
    """
    shared = [f for f in fields(ModelOptions) if f.name not in without]
    hints = get_type_hints(ModelOptions, include_extras=True)

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "options"]
        added = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
            )
            for f in shared
        ]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            options = ModelOptions(**{f.name: kwargs.pop(f.name) for f in shared})
            if options.verbose:  # at the level the app's callback set
                setup_logging(logging.getLevelName(logging.getLogger().level), verbose=True)
            return command(*args, options=options, **kwargs)

        run.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return run  # type: ignore[return-value]

    return decorate


ConversationOpt = Annotated[
    str | None, typer.Option("--conversation", help="Continue this earlier conversation (id).")
]
StoreOpt = Annotated[
    bool, typer.Option("--store/--no-store", help="Record turns in PostgreSQL (the turn log).")
]


@contextlib.contextmanager
def _maybe_store(settings: Settings, enabled: bool) -> Iterator[Any]:
    """The turn store and reservation book (``app.Persistence``), or None with --no-store."""
    if not enabled:
        yield None
        return
    from voicebot.app import open_persistence

    with open_persistence(settings) as persistence:
        yield persistence


def _runtime(settings: Settings, persistence: Any, **kwargs: Any) -> Any:
    from voicebot.app import build_runtime

    if persistence is None:
        return build_runtime(settings, **kwargs)
    return build_runtime(
        settings, store=persistence.store, reservations=persistence.reservations, **kwargs
    )


def _resume(store: Any, conversation_id: uuid.UUID | None, limit: int) -> tuple[list[Any], int]:
    """The history window of an earlier conversation (oldest first) and its last turn number."""
    if conversation_id is None:
        return [], 0
    if store is None:
        raise VoicebotError("--conversation needs the turn log (drop --no-store)")
    turns = store.recent_turns(conversation_id, limit)
    messages = [m for turn in turns for m in turn.history_messages()]
    return messages, max((t.sequence for t in turns), default=0)


def make_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the CLI flags that were given on top."""
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except Exception as e:  # pydantic's message names the field
        raise VoicebotError(f"invalid setting: {e}") from e


def _offer_pull(client: Any, model: str) -> bool:
    """At a terminal, offer to pull a persona's missing model (with a progress bar)."""
    if not sys.stdin.isatty():
        return False
    from voicebot.doctor import offer_pull

    return offer_pull(client, model)


@app.callback()
def _main(
    ctx: typer.Context,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning")] = "info",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Every library's log lines.")
    ] = False,
) -> None:
    setup_logging(log_level, verbose=verbose)
    ctx.obj = make_settings  # what the history and db commands read their settings with
    # A service manager stops us with SIGTERM: unwind as for Ctrl-C, so the turn log drains
    # and the embedded PostgreSQL server stops instead of being left running.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@app.command()
@models()
def ui(
    options: ModelOptions,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    store: StoreOpt = True,
) -> None:
    """The main job: the voice agent's web page (default http://127.0.0.1:7860)."""
    from voicebot.server.serving import run as run_draining

    try:
        settings = options.settings(host=host, port=port)
        from voicebot.server.access import check_exposure, install_log_redaction, log_secrets

        check_exposure(settings)
        install_log_redaction(log_secrets(settings))
        # Models load before the port opens, so a start-up error is one line (exit 2).
        with _page_backend(settings, store) as loaded:
            from voicebot.server.app import create_page_app

            # The page alone, served as `serve` serves it: one guard, line book, resume
            # rule and drain.
            application = create_page_app(
                settings,
                backend=lambda _: contextlib.nullcontext(loaded),
                conversation_log=store,
            )
            _announce_when_started(
                application,
                f"voicebot is listening on http://{settings.host}:{settings.port}",
                step_line="page      served",
            )
            # The first SIGTERM drains the calls (VOICEBOT_DRAIN_TIMEOUT_S) before uvicorn
            # stops; then the turn log flushes and the embedded PostgreSQL stops.
            run_draining(
                application,
                host=settings.host,
                port=settings.port,
                drain_timeout_s=settings.drain_timeout_s,
            )
    except VoicebotError as e:
        fail(e)


@contextlib.contextmanager
def _page_backend(settings: Settings, store: bool) -> Iterator[Any]:
    """What ``voicebot ui`` serves: the turn log (unless --no-store) and every persona's
    models, offering to pull a missing LLM at a terminal (``server.Backend``)."""
    from voicebot.server.service import Backend

    with _maybe_store(settings, store) as persistence:
        runtime = _runtime(settings, persistence, offer_pull=_offer_pull)
        yield Backend(runtime, persistence.store.dsn if persistence is not None else None)


@app.command()
@models()
def simulate(
    options: ModelOptions,
    wav: Annotated[Path, typer.Argument(help="The caller's audio (WAV, any rate).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the agent's audio on the input timeline.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per turn.")] = False,
    greet: Annotated[bool, typer.Option(help="Speak the persona's greeting first.")] = False,
    conversation: ConversationOpt = None,
    store: StoreOpt = True,
) -> None:
    """Run a recording through the same handler as a call, at real-time pace."""
    import soundfile

    from voicebot.simulate import simulate_call, turn_record

    try:
        settings = options.settings()
        conversation_id = uuid.UUID(conversation) if conversation else None
        samples, rate = soundfile.read(str(wav), dtype="float32", always_2d=False)
    except (VoicebotError, OSError, ValueError, RuntimeError) as e:
        fail(e)
    try:
        with _maybe_store(settings, store) as persistence:
            runtime = _runtime(settings, persistence, personas=[settings.persona])
            turn_store = runtime.store
            history, last_sequence = _resume(
                turn_store, conversation_id, runtime.stack(settings.persona).persona.history_turns
            )
            result = simulate_call(
                runtime,
                (int(rate), samples),
                persona=settings.persona,
                conversation_id=conversation_id,
                history=history,
                sequence_start=last_sequence,
                greet=greet,
            )
    except VoicebotError as e:
        fail(e)
    for turn in result.turns:
        record = turn_record(turn)
        if as_json:
            typer.echo(json.dumps(record, ensure_ascii=False))
        else:
            t = record["timings"]
            typer.echo(f"[{turn.sequence}] you: {turn.user_text}")
            typer.echo(
                f"    agent: {turn.assistant_text}{' (interrupted)' if turn.interrupted else ''}"
            )
            typer.echo(
                "    "
                + "  ".join(
                    f"{k.removesuffix('_ms')} {v:.0f} ms" for k, v in t.items() if v is not None
                )
            )
    if out is not None:
        rate_out, audio = result.reply_audio
        soundfile.write(str(out), audio, rate_out)


@app.command()
@models()
def doctor(
    options: ModelOptions,
    pull: Annotated[bool, typer.Option(help="Offer to pull missing Ollama models.")] = False,
) -> None:
    """Check every dependency and say what is missing; non-zero exit if anything is."""
    from voicebot.doctor import run_checks

    try:
        settings = options.settings()
    except VoicebotError as e:
        fail(e)
    ok = True
    for check in run_checks(settings, pull=pull, interactive=sys.stdin.isatty()):
        mark = "ok " if check.ok else "MISSING"
        typer.echo(f"[{mark}] {check.name}: {check.detail}")
        ok = ok and check.ok
    if not ok:
        raise typer.Exit(1)


@app.command()
@models()
def serve(
    options: ModelOptions,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 7860).")] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the Gradio page at /ui.")] = True,
) -> None:
    """Serve the API, the phone routes and (optionally) the page with uvicorn."""
    try:
        settings = options.settings(host=host, port=port)
        from voicebot.server import check_exposure

        check_exposure(settings)
    except VoicebotError as e:
        fail(e)
    from voicebot.server import create_app
    from voicebot.server.access import install_log_redaction, log_secrets
    from voicebot.server.serving import run as run_draining

    install_log_redaction(log_secrets(settings))
    try:
        application = create_app(settings, ui=ui)
    except VoicebotError as e:
        fail(e)
    _announce_when_started(
        application, f"voicebot is serving on http://{settings.host}:{settings.port}"
    )
    # The first SIGTERM drains the calls (VOICEBOT_DRAIN_TIMEOUT_S) before uvicorn stops.
    run_draining(
        application,
        host=settings.host,
        port=settings.port,
        drain_timeout_s=settings.drain_timeout_s,
    )


def _announce_when_started(application: Any, line: str, *, step_line: str = "ready") -> None:
    """Print ``line`` (the URL) once the app's lifespan has loaded the models: the last
    start-up line."""
    starting = application.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with starting(app) as state:
            step(f"  {step_line}", ready=True)
            typer.echo(line)
            yield state

    application.router.lifespan_context = lifespan


@app.command()
@models()
def phone(
    options: ModelOptions,
    port: Annotated[int, typer.Option(help="Local port for FastRTC's server.")] = 8000,
) -> None:
    """A quick phone trial on a temporary number (FastRTC fastphone; needs HF_TOKEN, internet)."""
    try:
        settings = options.settings()
    except VoicebotError as e:
        fail(e)
    token = settings.hf_token.get_secret_value() if settings.hf_token else ""
    if not token:
        fail(
            VoicebotError(
                "voicebot phone needs a Hugging Face token: create one at "
                "https://huggingface.co/settings/tokens and `export HF_TOKEN=hf_...` "
                "(it also needs internet access; for your own number use `voicebot serve` "
                "with Twilio, see docs/serving.md)"
            )
        )
        return
    from fastrtc import Stream

    from voicebot.handler import VoiceHandler

    try:
        with _maybe_store(settings, True) as persistence:
            runtime = _runtime(settings, persistence, personas=[settings.persona])
            stream = Stream(
                VoiceHandler(runtime, channel="phone"),
                modality="audio",
                mode="send-receive",
                concurrency_limit=settings.concurrency_limit,
                time_limit=settings.time_limit_s,
            )
            stream.fastphone(token=token, host="127.0.0.1", port=port)
    except VoicebotError as e:
        fail(e)


def _register_store_commands() -> None:
    from voicebot.store_cli import register

    register(app)


_register_store_commands()
_register_reservations(app, lambda: make_settings())


@app.command()
@models(without=("persona",))
def bench(
    options: ModelOptions,
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="Corpus dir (WAVs + manifest.jsonl).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write every figure here.")
    ] = None,
    plot_out: Annotated[
        Path | None, typer.Option("--plot", help="Write the PNG plot here.")
    ] = None,
    llm_profile: Annotated[
        str, typer.Option("--llm-profile", help="Scripted LLM timing: gpu-8b, cpu-3b, instant.")
    ] = "gpu-8b",
    sessions: Annotated[
        int, typer.Option("--sessions", help="Also run 1, 2, 4 … N simultaneous calls.")
    ] = 1,
    sessions_baseline: Annotated[
        bool, typer.Option("--sessions-baseline", help="Scale the baseline too.")
    ] = False,
    repeats: Annotated[int, typer.Option("--repeats", help="Passes over the corpus.")] = 2,
    limit: Annotated[
        int | None, typer.Option("--limit", help="First N items of each language.")
    ] = None,
    languages: Annotated[str, typer.Option("--languages", help="Comma-separated.")] = "en,ja",
    stt_model_ja: Annotated[
        str | None, typer.Option("--stt-model-ja", help="Multilingual whisper for Japanese.")
    ] = None,
    preemptive: Annotated[
        str,
        typer.Option(
            "--preemptive",
            help="Ours with preemptive replies on (started on the STT draft), nodraft (on, "
            "started on the full transcript) or off; several, e.g. on,nodraft,off: the first "
            "is the main run, the others reported apart. Default: the settings'.",
        ),
    ] = "",
    transport: Annotated[
        str,
        typer.Option(
            "--transport",
            help="simulate (in-process harness, ours and the cookbook) or webrtc (ours over a "
            "real WebRTC call to the served app, next to the harness).",
        ),
    ] = "simulate",
) -> None:
    """Voice-to-voice latency of voicebot next to the FastRTC cookbook pipeline."""
    from voicebot.bench.main import DEFAULT_CORPUS, BenchOptions, run_bench, run_webrtc_bench
    from voicebot.bench.report import format_table, plot

    def progress(m: Any) -> None:
        v2v = "-" if m.v2v_ms is None else f"{m.v2v_ms:.0f} ms"
        label = f"{m.pipeline} ({m.variant})" if m.variant else m.pipeline
        typer.echo(
            f"  {label:<8} {m.item:<6} N={m.sessions} v2v {v2v}"
            + (f"  ({'; '.join(m.notes)})" if m.notes else ""),
            err=True,
        )

    bench_options = BenchOptions(
        corpus=corpus or DEFAULT_CORPUS,
        languages=tuple(x.strip() for x in languages.split(",") if x.strip()),
        repeats=repeats,
        limit=limit,
        llm_profile=llm_profile,
        ollama_host=options.ollama_host,  # none: the scripted profile
        sessions=sessions,
        sessions_baseline=sessions_baseline,
        stt_model=options.stt_model,
        stt_model_ja=stt_model_ja,
        tts_voice=options.tts_voice,
        preemptive=_preemptive_list(preemptive),
        transport=transport,
    )
    if transport not in ("simulate", "webrtc"):
        fail(ConfigError(f"--transport must be simulate or webrtc, not {transport!r}"))
    if transport == "webrtc":

        def rtc_progress(m: Any) -> None:
            def fmt(value: float | None) -> str:
                return "-" if value is None else f"{value:.0f}"

            routes = [("simulate", m.simulate), *m.webrtc.items()]
            figures = "; ".join(
                f"{name} {fmt(r.heard_ms)} (in {fmt(r.input_ms)}, out {fmt(r.output_ms)}, "
                f"client {fmt(r.client_buffer_ms)})"
                + (f" [{', '.join(r.notes)}]" if r.notes else "")
                for name, r in routes
            )
            typer.echo(f"  {m.item:<6} heard ms: {figures}", err=True)

        try:
            rtc = run_webrtc_bench(
                bench_options, make_settings(device=options.device), progress=rtc_progress
            )
        except (VoicebotError, ValueError) as e:
            fail(e)
        typer.echo(rtc.table())
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(rtc.to_json(), encoding="utf-8")
        return
    try:
        report = run_bench(bench_options, make_settings(device=options.device), progress=progress)
    except (VoicebotError, ValueError) as e:
        fail(e)
    typer.echo(format_table(report))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.to_json(), encoding="utf-8")
    if plot_out is not None:
        plot(report, plot_out)


def _preemptive_list(value: str) -> tuple[str, ...]:
    """ "on,off" → ("on", "off"); a bad or repeated word is a usage error."""
    from voicebot.bench.runner import PREEMPTIVE_SETTINGS

    words = [w.strip().lower() for w in value.split(",") if w.strip()]
    bad = [w for w in words if w not in PREEMPTIVE_SETTINGS]
    if bad or len(set(words)) != len(words):
        raise typer.BadParameter(
            f"expected some of {', '.join(PREEMPTIVE_SETTINGS)}, comma-separated; got {value!r}",
            param_hint="--preemptive",
        )
    return tuple(words)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
