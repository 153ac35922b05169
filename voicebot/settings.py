"""The one settings object, read once from the environment (``VOICEBOT_*`` and ``OLLAMA_HOST``).

This is the only module that reads the environment; everything else receives plain values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    from platformdirs import user_data_path

    return user_data_path("voicebot", appauthor=False)


def _default_personas_dir() -> Path:
    # A source checkout keeps personas/ beside the package; an install can point elsewhere.
    return Path(__file__).resolve().parent.parent / "personas"


class IceServer(BaseModel):
    """One entry of ``RTCConfiguration.iceServers`` (a STUN or TURN server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    urls: str | list[str] = Field(min_length=1)
    """``stun:host:port``, ``turn:host:port?transport=udp``, ``turns:host:5349``."""
    username: str | None = None
    credential: str | None = None

    @field_validator("urls")
    @classmethod
    def _known_schemes(cls, value: str | list[str]) -> str | list[str]:
        for url in [value] if isinstance(value, str) else value:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ValueError(f"ICE server URL {url!r} must start with stun:, turn: or turns:")
        return value


class RtcConfiguration(BaseModel):
    """The WebRTC ``RTCConfiguration`` the page and the server use (only ICE servers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iceServers: list[IceServer]  # the WebRTC name, as browsers take it

    def as_dict(self) -> dict[str, Any]:
        """The JSON object ``RTCPeerConnection`` (browser and aiortc via FastRTC) takes."""
        return self.model_dump(exclude_none=True)


class Settings(BaseSettings):
    """Everything configurable, with the environment variable in brackets."""

    model_config = SettingsConfigDict(
        env_prefix="VOICEBOT_", env_file=None, extra="ignore", populate_by_name=True
    )

    # --- where things live
    data_dir: Path = Field(default_factory=_default_data_dir)
    """Models, voices, the embedded database and the spool live here [VOICEBOT_DATA_DIR]."""
    personas_dir: Path = Field(default_factory=_default_personas_dir)
    """Directory of persona TOML files [VOICEBOT_PERSONAS_DIR]."""
    persona: str = "assistant-en"
    """The persona a call starts with [VOICEBOT_PERSONA]."""

    # --- speech recognition
    stt_model: str | None = None
    """faster-whisper size name or local CTranslate2 directory; default depends on device and
    language [VOICEBOT_STT_MODEL]."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where STT (and piper, when CUDA) runs [VOICEBOT_DEVICE]."""
    stt_compute_type: str = "auto"
    """CTranslate2 compute type; auto = float16 on CUDA, int8 on CPU [VOICEBOT_STT_COMPUTE_TYPE]."""
    stt_cpu_threads: int = Field(default=0, ge=0)
    """CPU threads per transcription; 0 = the cores divided among the STT workers
    (voicebot.cpu.thread_plan) [VOICEBOT_STT_CPU_THREADS]."""
    stt_workers: int = Field(default=0, ge=0)
    """Transcriptions run at the same time (CTranslate2 workers), shared by all calls; 0 = one
    per two cores, 1 to 4 [VOICEBOT_STT_WORKERS]."""
    stt_short_window: bool = False
    """Decode only the utterance plus a measured padding instead of whisper's 30 s window,
    falling back to the full window when the transcript looks degenerate; 3-10x faster
    [VOICEBOT_STT_SHORT_WINDOW]. Off by default: tiny.en then hears some rare words
    differently from the full window ("Eiffel" as "Eival", "France" as "friends"), whatever
    the padding; see docs/benchmarks.md, "STT: variable-length whisper encoding". What the
    app does instead is use the short window as a checked draft (``stt_draft``)."""

    stt_draft: bool = True
    """When a pause may end the turn, first decode the short window as a draft and start
    preparing the answer on it while the full window transcribes the same audio; the answer
    plays only if both hear the same words, so the turn's text is always the full window's
    [VOICEBOT_STT_DRAFT]. Only where the short window is off, and only for the languages
    where it was measured to pay (``stt.DRAFT_LANGUAGES``: English)."""

    # --- speech synthesis
    tts_voice: str | None = None
    """Piper voice name or local .onnx path, overriding the persona's [VOICEBOT_TTS_VOICE]."""
    tts_threads: int = Field(default=0, ge=0)
    """onnxruntime threads of a piper voice on CPU; 0 = half the cores, at least 1
    (voicebot.cpu.thread_plan) [VOICEBOT_TTS_THREADS]."""

    first_chunk_paced: bool = True
    """Let a reply's first chunk end at an earlier clause boundary ("Sure,") when the voice and
    the model, measured on the replies so far, are fast enough that the next chunk is ready
    before it has played (voicebot.pace); off: the language's fixed minimum (24 characters
    in English) [VOICEBOT_FIRST_CHUNK_PACED]."""

    # --- language model
    ollama_host: str = Field(
        default="http://127.0.0.1:11434",
        validation_alias=AliasChoices("OLLAMA_HOST", "VOICEBOT_OLLAMA_HOST", "ollama_host"),
    )
    """Ollama's base URL [OLLAMA_HOST]."""
    llm_timeout_s: float = 20.0
    """Longest wait for any read from Ollama, first token included [VOICEBOT_LLM_TIMEOUT_S]."""
    llm_connect_timeout_s: float = 2.0
    """Longest wait to connect to Ollama [VOICEBOT_LLM_CONNECT_TIMEOUT_S]."""
    llm_keep_alive: str = "30m"
    """How long Ollama keeps the model loaded after a request [VOICEBOT_LLM_KEEP_ALIVE]."""
    llm_backend: Literal["ollama", "openai"] = "ollama"
    """Protocol of the LLM server for personas that do not name one: ``ollama``, or ``openai``
    for an OpenAI-compatible server (vLLM, llama-server, LM Studio, LiteLLM)
    [VOICEBOT_LLM_BACKEND]."""
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    """API root of the OpenAI-compatible server (or the router in front of several)
    [VOICEBOT_OPENAI_BASE_URL]."""
    openai_api_key: SecretStr | None = None
    """API key sent to the OpenAI-compatible server, if it wants one [VOICEBOT_OPENAI_API_KEY]."""

    # --- turn-taking (milliseconds)
    vad_threshold: float = 0.5
    """Speech probability at which a VAD window counts as voiced [VOICEBOT_VAD_THRESHOLD]."""
    min_speech_ms: int = 96
    """Voiced time before a user turn is considered started [VOICEBOT_MIN_SPEECH_MS]."""
    end_silence_ms: int = 320
    """Silence after the last voiced window that ends the turn [VOICEBOT_END_SILENCE_MS]."""
    pre_roll_ms: int = 320
    """Audio kept before the detected speech start so the first syllable is not clipped
    [VOICEBOT_PRE_ROLL_MS]."""
    max_utterance_s: float = 30.0
    """A turn longer than this is cut and answered [VOICEBOT_MAX_UTTERANCE_S]."""
    bargein_min_speech_ms: int = 160
    """Sustained user speech while the agent talks that stops the agent
    [VOICEBOT_BARGEIN_MIN_SPEECH_MS]."""

    turn_end_model: str = "smart-turn"
    """Hears whether the user finished the sentence: "smart-turn" (Smart Turn v3.2, fetched
    from huggingface.co/pipecat-ai/smart-turn-v3 on first start), a local .onnx path, or "off"
    for silence timing alone [VOICEBOT_TURN_END_MODEL]."""
    complete_silence_ms: int = 160
    """With the turn-end model: silence that ends a turn that sounds finished
    [VOICEBOT_COMPLETE_SILENCE_MS]."""
    incomplete_silence_ms: int = 1500
    """With the turn-end model: silence that ends a turn that sounds unfinished
    [VOICEBOT_INCOMPLETE_SILENCE_MS]."""
    turn_end_threshold: float = 0.7
    """With the turn-end model: probability from which a turn counts as finished
    [VOICEBOT_TURN_END_THRESHOLD]."""

    preemptive_replies: bool = True
    """Start the reply (STT → LLM → TTS) at the first pause, before the turn is confirmed, and
    hold its audio: it plays at once when the turn ends at that pause and is dropped (LLM
    stream closed, counted as a wasted request) when the user goes on
    [VOICEBOT_PREEMPTIVE_REPLIES]."""

    backchannel_max_ms: int = 1200
    """Overlapping speech up to this long may be a backchannel (aizuchi) that does not stop
    the agent; 0 = every barge-in stops it [VOICEBOT_BACKCHANNEL_MAX_MS]."""

    # --- database
    database_url: SecretStr | None = None
    """PostgreSQL DSN; unset = start an embedded server under data_dir [VOICEBOT_DATABASE_URL]."""
    store_queue_size: int = 1000
    """Turn records waiting for the database writer before they go to the spool
    [VOICEBOT_STORE_QUEUE_SIZE]."""

    # --- serving
    host: str = "127.0.0.1"
    """Address the UI/server binds [VOICEBOT_HOST]."""
    port: int = 7860
    """Port the UI/server binds [VOICEBOT_PORT]."""
    api_token: SecretStr | None = None
    """Bearer token required on offer, websocket and API routes [VOICEBOT_API_TOKEN]."""
    concurrency_limit: int = 8
    """Simultaneous calls (web and phone together) [VOICEBOT_CONCURRENCY_LIMIT]."""
    time_limit_s: float = 1800.0
    """Longest call in seconds [VOICEBOT_TIME_LIMIT_S]."""
    drain_timeout_s: float = 60.0
    """On SIGTERM, how long calls in progress may go on before the persona's goodbye ends them
    [VOICEBOT_DRAIN_TIMEOUT_S]; meanwhile no new call is admitted and /readyz answers 503."""
    cors_origins: list[str] = Field(default_factory=list)
    """Browser origins allowed to call the API (JSON list); empty = CORS off
    [VOICEBOT_CORS_ORIGINS]."""
    max_body_bytes: int = 65536
    """Largest request body accepted on the offer and API routes [VOICEBOT_MAX_BODY_BYTES]."""
    rtc_configuration: RtcConfiguration | None = None
    """ICE servers for WebRTC callers behind NAT, as JSON, e.g. {"iceServers": [{"urls":
    "turn:turn.example.com:3478", "username": "u", "credential": "p"}]}; the page's browser
    and the server's side of every call both use them; unset = host candidates only
    [VOICEBOT_RTC_CONFIGURATION]."""
    rtc_low_latency: bool = True
    """WebRTC calls without the delays of FastRTC's and aiortc's defaults (about 120 ms): the
    caller's audio reaches the VAD as each packet arrives, frame by frame (not after aiortc's
    4-packet jitter buffer, nor in FastRTC's 60 ms batches), and the reply's audio is handed to
    the track at Opus's 48 kHz (aiortc's resampler would hold each frame back 20 ms); false
    puts the defaults back [VOICEBOT_RTC_LOW_LATENCY]."""
    public_url: str | None = None
    """The server's public base URL as Twilio sees it (https://...), used to build the Media
    Stream URL and to check Twilio signatures behind a proxy [VOICEBOT_PUBLIC_URL]."""

    # --- telephone
    twilio_auth_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "TWILIO_AUTH_TOKEN", "VOICEBOT_TWILIO_AUTH_TOKEN", "twilio_auth_token"
        ),
    )
    """Twilio account auth token: every Twilio request's signature is checked with it
    [TWILIO_AUTH_TOKEN]."""
    phone_personas: dict[str, str] = Field(default_factory=dict)
    """Persona per called number, e.g. {"+15551234567": "assistant-en"} (JSON); other numbers
    get the default persona [VOICEBOT_PHONE_PERSONAS]."""
    caller_hash_salt: SecretStr | None = None
    """Salt for the stored hash of a caller's number; unset = a random salt kept in data_dir
    [VOICEBOT_CALLER_HASH_SALT]."""
    hf_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HF_TOKEN", "VOICEBOT_HF_TOKEN", "hf_token")
    )
    """Hugging Face token for ``voicebot phone`` (FastRTC's temporary number) [HF_TOKEN]."""

    @property
    def voices_dir(self) -> Path:
        """Downloaded piper voices."""
        return self.data_dir / "voices"

    @property
    def cache_dir(self) -> Path:
        """Model caches (e.g. the Japanese TTS model)."""
        return self.data_dir / "cache"

    @property
    def spool_path(self) -> Path:
        """Turn records that could not reach the database yet."""
        return self.data_dir / "spool.jsonl"

    @property
    def pg_data_dir(self) -> Path:
        """The embedded PostgreSQL server's data directory."""
        return self.data_dir / "postgres"
