"""Personas: data files (``personas/*.toml``) that say who the agent is and how it sounds."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voicebot.errors import ConfigError


class Sampling(BaseModel):
    """LLM sampling options passed to Ollama as ``options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    num_predict: int = Field(default=160, gt=0)
    """Upper bound on reply tokens: spoken replies should be short."""

    def as_options(self) -> dict[str, Any]:
        """The Ollama ``options`` mapping."""
        return self.model_dump()


class Persona(BaseModel):
    """One persona file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    display_name: str
    language: Literal["en", "ja"]
    llm_model: str
    llm_backend: Literal["ollama", "openai"] | None = None
    """Protocol of the server that runs ``llm_model``; unset = VOICEBOT_LLM_BACKEND."""
    tts: Literal["piper", "kokoro-ja"] = "piper"
    tts_voice: str
    greeting: str
    apology: str
    """Said once when a stage fails mid-turn; the call goes on."""
    busy_message: str = ""
    """Said before hanging up when every line is taken."""
    goodbye: str = ""
    """Said when the call's time limit is reached."""
    system_prompt: str
    history_turns: int = Field(default=8, ge=0, le=100)
    """How many earlier turns the LLM sees."""
    sampling: Sampling = Field(default_factory=lambda: Sampling())
    backchannels: tuple[str, ...] = ()
    """Short acknowledgements (aizuchi) that must not stop the agent; empty = language default."""


def load_persona(path: Path) -> Persona:
    """Read and validate one persona file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"persona file {path}: cannot read it ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"persona file {path}: invalid TOML: {e}") from e
    try:
        persona = Persona.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '?'}': {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"persona file {path}: {problems}") from e
    if persona.name != path.stem:
        raise ConfigError(
            f"persona file {path}: field 'name': '{persona.name}' must match the file name "
            f"'{path.stem}'"
        )
    return persona


def load_personas(directory: Path) -> dict[str, Persona]:
    """All personas in a directory, by name; raises ConfigError if there are none."""
    if not directory.is_dir():
        raise ConfigError(
            f"personas directory {directory} does not exist: set VOICEBOT_PERSONAS_DIR"
        )
    personas = {p.name: p for p in map(load_persona, sorted(directory.glob("*.toml")))}
    if not personas:
        raise ConfigError(f"no persona files (*.toml) in {directory}")
    return personas
