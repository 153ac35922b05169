"""Phone calls over a real websocket: a simulated Twilio Media Streams client against uvicorn.

The client follows Twilio's documented sequence (``connected``, ``start`` with a ``streamSid``
and custom parameters, 20 ms base64 μ-law ``media`` frames at real-time pace, ``mark``,
``stop``), plays what it receives at real-time pace, echoes a ``mark`` when the audio before it
has been played and, on ``clear``, drops unplayed audio and echoes pending marks at once (as
Twilio does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests import fakes
from tests.fakes import tone
from tests.support_served import LiveServer, backend_of, served_runtime
from tests.support_voice import KeywordScript, joe, say
from voicebot.audio import StreamResampler, resample
from voicebot.ollama_server import OllamaProtocolServer
from voicebot.runtime import Runtime
from voicebot.server import create_app, default_backend
from voicebot.settings import Settings
from voicebot.store import InMemoryTurnStore
from voicebot.telephony import (
    SignatureChecker,
    caller_hash,
    decode_media,
    encode_media,
    load_salt,
    twiml_busy,
    twiml_connect,
    ulaw_decode,
    ulaw_encode,
)


def to_8k(audio: tuple[int, np.ndarray]) -> np.ndarray:
    rate, samples = audio
    return resample(samples.astype(np.float32), rate, 8000)


@dataclass
class Heard:
    """What the simulated caller received."""

    media_frames: int = 0
    audio: list[np.ndarray] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    clears: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def pcm(self) -> np.ndarray:
        if not self.audio:
            return np.zeros(0, np.float32)
        return np.concatenate(self.audio).astype(np.float32) / 32768.0


class TwilioClient:
    """A simulated Twilio Media Streams connection (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        stream_sid: str | None = None,
        parameters: dict[str, str] | None = None,
        call_sid: str | None = None,
    ) -> None:
        self.url = url
        self.headers = headers or {}
        self.stream_sid = stream_sid or f"MZ{uuid.uuid4().hex}"
        self.call_sid = call_sid or f"CA{uuid.uuid4().hex}"
        self.parameters = parameters or {}
        self.heard = Heard()
        self.ws: ClientConnection | None = None
        self._sequence = 0
        self._chunk = 0
        self._play_end = 0.0
        self._pending_marks: dict[str, asyncio.TimerHandle] = {}
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TwilioClient:
        self.ws = await connect(self.url, additional_headers=self.headers, max_size=None)
        self._reader = asyncio.create_task(self._read())
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "start": {
                    "accountSid": "AC" + "0" * 32,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self.parameters,
                },
                "streamSid": self.stream_sid,
            }
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def _next_seq(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(data)

    async def speak(self, samples_8k: np.ndarray) -> None:
        """Send float32 8 kHz audio as 20 ms media frames at real-time pace."""
        t0 = time.monotonic()
        for i, start in enumerate(range(0, samples_8k.size, 160)):
            frame = samples_8k[start : start + 160]
            if frame.size < 160:
                frame = np.pad(frame, (0, 160 - frame.size))
            self._chunk += 1
            await self.send(
                {
                    "event": "media",
                    "sequenceNumber": self._next_seq(),
                    "media": {
                        "track": "inbound",
                        "chunk": str(self._chunk),
                        "timestamp": str(self._chunk * 20),
                        "payload": encode_media(frame),
                    },
                    "streamSid": self.stream_sid,
                }
            )
            delay = t0 + (i + 1) * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def silence(self, seconds: float) -> None:
        """Send silence, as a phone line does; stops quietly once the server hung up."""
        with contextlib.suppress(ConnectionClosed):
            await self.speak(np.zeros(int(seconds * 8000), np.float32))

    async def stop(self) -> None:
        await self.send(
            {
                "event": "stop",
                "sequenceNumber": self._next_seq(),
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": "CA"},
                "streamSid": self.stream_sid,
            }
        )

    async def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Keep the line open with silence until ``predicate()`` holds."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline or self.heard.closed.is_set():
                return bool(predicate())
            await self.silence(0.1)
        return True

    def _echo(self, name: str) -> None:
        self._pending_marks.pop(name, None)
        self.heard.marks.append(name)
        if self.ws is not None:
            task = asyncio.ensure_future(self._send_mark(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_mark(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self.send(
                {
                    "event": "mark",
                    "sequenceNumber": self._next_seq(),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )

    async def _read(self) -> None:
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                self.heard.events.append(message)
                event = message.get("event")
                assert message.get("streamSid") == self.stream_sid or event not in (
                    "media",
                    "mark",
                    "clear",
                )
                now = loop.time()
                if event == "media":
                    pcm = decode_media(message["media"]["payload"])
                    self.heard.audio.append(pcm)
                    self.heard.media_frames += 1
                    self._play_end = max(now, self._play_end) + pcm.size / 8000
                elif event == "mark":
                    name = message["mark"]["name"]
                    delay = max(0.0, self._play_end - now)
                    self._pending_marks[name] = loop.call_later(delay, self._echo, name)
                elif event == "clear":
                    self.heard.clears += 1
                    self._play_end = now
                    for name, handle in list(self._pending_marks.items()):
                        handle.cancel()
                        self._echo(name)
        except Exception:
            pass
        finally:
            self.heard.closed.set()


def loud(samples: np.ndarray, threshold: float = 0.05) -> float:
    """Seconds of audio above ``threshold``."""
    return float(np.count_nonzero(np.abs(samples) > threshold)) / 8000


# --- units ------------------------------------------------------------------------------------


def test_ulaw_matches_the_g711_reference() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    pcm = np.linspace(-32768, 32767, 20001).astype(np.int16)
    assert ulaw_encode(pcm) == audioop.lin2ulaw(pcm.tobytes(), 2)
    every_byte = bytes(range(256))
    expected = np.frombuffer(audioop.ulaw2lin(every_byte, 2), np.int16)
    assert np.array_equal(ulaw_decode(every_byte), expected)


def test_downsampler_keeps_speech_band_and_joins_frames_smoothly() -> None:
    rate = 24000
    t = np.arange(rate) / rate
    signal = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    down = StreamResampler(rate, 8000)
    out = np.concatenate([down(signal[i : i + 480]) for i in range(0, signal.size, 480)])
    assert out.size == 8000
    reference = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    # same tone (after the filter's delay), no clicks at the 20 ms boundaries
    steady = out[400:]
    assert abs(np.sqrt(np.mean(steady**2)) - np.sqrt(np.mean(reference**2))) < 0.02
    assert np.max(np.abs(np.diff(steady))) < 0.2


def test_decode_media_rejects_non_base64() -> None:
    with pytest.raises(ValueError):
        decode_media("not base64 !!")
    assert decode_media(base64.b64encode(b"\xff" * 160).decode()).size == 160


def test_twiml_connects_the_stream_with_parameters_and_busy_says_then_hangs_up() -> None:
    xml = twiml_connect(
        "wss://example.org/voice/telephone/handler", {"persona": "a", "caller": "h:1"}
    )
    assert '<Stream url="wss://example.org/voice/telephone/handler">' in xml
    assert '<Parameter name="persona" value="a" />' in xml
    busy = twiml_busy("ただいま混み合っております。", "ja")
    assert '<Say language="ja-JP">' in busy and busy.endswith("<Hangup /></Response>")


def test_caller_hash_is_salted_stable_and_hides_the_number(tmp_path: Path) -> None:
    salt = load_salt(None, tmp_path / "salt")
    assert load_salt(None, tmp_path / "salt") == salt  # kept, not regenerated
    assert (tmp_path / "salt").stat().st_mode & 0o777 == 0o600
    h = caller_hash("+15551234567", salt)
    assert h == caller_hash("+15551234567", salt)
    assert "5551234567" not in h
    assert h != caller_hash("+15551234567", b"other salt")
    assert h != caller_hash("+15551234568", salt)


def test_signature_checker_accepts_twilio_signatures_only() -> None:
    checker = SignatureChecker("auth-token")
    url = "https://example.org/telephone/incoming"
    params = {"From": "+1555", "To": "+1666", "CallSid": "CA1"}
    good = checker.sign(url, params)
    assert checker.valid(url, params, good)
    assert not checker.valid(url, params, None)
    assert not checker.valid(url, {**params, "To": "+1777"}, good)
    assert not checker.valid(url, params, SignatureChecker("other").sign(url, params))


# --- calls with fakes at the model seams ------------------------------------------------------


def test_phone_call_answers_survives_garbage_and_counts_toward_the_limit(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, concurrency_limit=1, time_limit_s=60)
    app = create_app(settings, backend=backend_of(served_runtime()))
    with LiveServer(app) as live:

        async def scenario() -> None:
            async with TwilioClient(f"{live.ws}/telephone/handler") as caller:
                # the greeting plays, then a mark confirms it was heard
                assert await caller.wait_for(lambda: caller.heard.marks, 10)
                greeting_frames = caller.heard.media_frames
                assert greeting_frames > 10
                # garbage of every kind mid-call
                await caller.send_raw("{not json")
                await caller.send_raw(b"\x00\x01binary")
                await caller.send({"event": "media", "media": {"payload": "%%%"}})
                await caller.send({"event": "media"})
                await caller.send({"event": "surprise", "streamSid": caller.stream_sid})
                await caller.send_raw(json.dumps([1, 2, 3]))
                # the call goes on: speak and hear the answer
                await caller.speak(to_8k((16000, tone(0.8))))
                marks = len(caller.heard.marks)
                assert await caller.wait_for(lambda: len(caller.heard.marks) > marks, 10)
                assert caller.heard.media_frames > greeting_frames + 10
                # a second call while this one is up: busy message in the persona's voice
                async with TwilioClient(f"{live.ws}/telephone/handler") as second:
                    await asyncio.wait_for(second.heard.closed.wait(), 10)
                    assert "busy" in second.heard.marks
                    assert loud(second.heard.pcm()) > 0.2
                # and an API call is refused too
                import httpx

                async with httpx.AsyncClient() as http:
                    reply = await http.post(
                        f"{live.http}/webrtc/offer",
                        json={"sdp": "v=0", "type": "offer", "webrtc_id": "x"},
                    )
                assert reply.status_code == 503
                assert reply.json()["meta"]["error"] == "concurrency_limit_reached"
                await caller.stop()
                await asyncio.wait_for(caller.heard.closed.wait(), 5)

        asyncio.run(scenario())


def test_a_vanished_caller_frees_its_slot_within_2_s(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, concurrency_limit=1, time_limit_s=60)
    app = create_app(settings, backend=backend_of(served_runtime()))
    with LiveServer(app) as live:

        async def scenario() -> float:
            async with TwilioClient(f"{live.ws}/telephone/handler") as caller:
                assert await caller.wait_for(lambda: caller.heard.media_frames > 5, 10)
                assert caller.ws is not None
                caller.ws.transport.abort()  # no stop, no close frame: the line just drops
                gone = time.monotonic()
            # a new call is admitted (not told "busy") as soon as the slot is free
            while True:
                async with TwilioClient(f"{live.ws}/telephone/handler") as again:
                    await asyncio.sleep(0.3)
                    if "busy" not in again.heard.marks and not again.heard.closed.is_set():
                        return time.monotonic() - gone
                assert time.monotonic() - gone < 5, "slot never freed"

        freed_after = asyncio.run(scenario())
        assert freed_after < 2.5  # 2 s, plus the probe call's own 0.3 s


def test_time_limit_says_goodbye_and_hangs_up(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, concurrency_limit=2, time_limit_s=1.5)
    runtime = served_runtime()
    app = create_app(settings, backend=backend_of(runtime))
    with LiveServer(app) as live:

        async def scenario() -> TwilioClient:
            async with TwilioClient(f"{live.ws}/telephone/handler") as caller:
                await caller.wait_for(lambda: False, 15)  # keep talking silence until hung up
                return caller

        caller = asyncio.run(scenario())
    assert caller.heard.closed.is_set()
    assert "goodbye" in caller.heard.marks  # the goodbye was played before the hang-up
    synth = runtime.stacks[runtime.default_persona].synthesizer
    assert "Time is up, goodbye." in synth.texts  # type: ignore[attr-defined]


def test_twilio_signatures_are_required_when_configured(tmp_path: Path) -> None:
    import httpx
    from websockets.exceptions import InvalidStatus

    settings = Settings(
        data_dir=tmp_path,
        twilio_auth_token="twilio-secret",
        api_token="api-secret",
        phone_personas={"+15550001111": "test-en"},
        caller_hash_salt="pepper",
    )
    app = create_app(settings, backend=backend_of(served_runtime()))
    checker = SignatureChecker("twilio-secret")
    with LiveServer(app) as live:
        url = f"{live.http}/telephone/incoming"
        form = {"CallSid": "CA1", "From": "+15559998888", "To": "+15550001111"}
        ok = httpx.post(url, data=form, headers={"X-Twilio-Signature": checker.sign(url, form)})
        assert ok.status_code == 200, ok.text
        assert "<Connect><Stream" in ok.text and "/telephone/handler" in ok.text
        # persona and caller stay on the server, with the stream's one-time ticket
        ticket = re.search(r'<Parameter name="ticket" value="([^"]+)" />', ok.text)
        assert ticket is not None, ok.text
        assert caller_hash("+15559998888", b"pepper") not in ok.text
        assert "5559998888" not in ok.text
        forged = httpx.post(
            url, data=form, headers={"X-Twilio-Signature": checker.sign(url, {**form, "To": "1"})}
        )
        assert forged.status_code == 403
        assert httpx.post(url, data=form).status_code == 403
        # the bearer token is not what protects Twilio's routes
        bearer = httpx.post(url, data=form, headers={"Authorization": "Bearer api-secret"})
        assert bearer.status_code == 403

        ws_url = f"{live.ws}/telephone/handler"

        async def scenario() -> None:
            with pytest.raises(InvalidStatus):
                async with TwilioClient(ws_url, headers={"X-Twilio-Signature": "forged"}):
                    pass
            signed = {"X-Twilio-Signature": checker.sign(ws_url, {})}
            async with TwilioClient(
                ws_url, headers=signed, parameters={"ticket": ticket[1]}, call_sid="CA1"
            ) as caller:
                assert await caller.wait_for(lambda: caller.heard.media_frames > 5, 10)
                await caller.stop()

        asyncio.run(scenario())


# --- end to end with real models --------------------------------------------------------------

ANSWER = "Paris is the capital of France."
LONG = (
    "Let me tell you a long story about an old lighthouse keeper. He lived alone on a small "
    "island far from the coast. Every evening he climbed the stairs and lit the great lamp. "
    "Ships passed safely through the dark and stormy nights. One winter a terrible storm came "
    "from the north. The waves were higher than anyone could remember."
)


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaProtocolServer]:
    script = KeywordScript([("france", ANSWER), ("story", LONG), ("enough", "Okay.")])
    with OllamaProtocolServer("gpu-8b", script=script) as server:
        yield server


def test_real_models_phone_call_hears_a_reply_and_barge_in_clears_twilio(
    ollama: OllamaProtocolServer,
    tiny_en_model_dir: Path,
    joe_voice_path: Path,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    import psycopg

    from voicebot.stt import WhisperTranscriber

    settings = Settings(
        data_dir=tmp_path,
        persona="assistant-en",
        stt_model=str(tiny_en_model_dir),
        tts_voice=str(joe_voice_path),
        ollama_host=ollama.base_url,
        database_url=pg_dsn,
        caller_hash_salt="pepper",
    )
    app = create_app(settings, backend=partial(default_backend, personas=["assistant-en"]))
    voice = joe(joe_voice_path)
    question = to_8k(say(voice, "What is the capital of France?"))
    story = to_8k(say(voice, "Please tell me a long story."))
    interrupt = to_8k(say(voice, "Stop, that is enough."))
    caller_ref = caller_hash("+15551230000", b"pepper")
    with LiveServer(app) as live:

        async def scenario() -> tuple[TwilioClient, int, int]:
            params = {"persona": "assistant-en", "caller": caller_ref}
            async with TwilioClient(f"{live.ws}/telephone/handler", parameters=params) as caller:
                assert await caller.wait_for(lambda: caller.heard.marks, 20)  # the greeting
                before_answer = len(caller.heard.audio)
                await caller.speak(question)
                marks = len(caller.heard.marks)
                assert await caller.wait_for(lambda: len(caller.heard.marks) > marks, 20)
                after_answer = len(caller.heard.audio)
                await caller.send_raw("garbage in the middle of a call")
                await caller.speak(story)
                frames = caller.heard.media_frames
                assert await caller.wait_for(lambda: caller.heard.media_frames > frames + 100, 20)
                await caller.speak(interrupt)  # talk over the story
                assert await caller.wait_for(lambda: caller.heard.clears > 0, 10)
                await caller.silence(1.0)
                await caller.stop()
                await asyncio.wait_for(caller.heard.closed.wait(), 10)
                return caller, before_answer, after_answer

        caller, before, after = asyncio.run(scenario())
        service_store_flush = time.monotonic() + 10
    # what the caller heard after the question is the answer, in words
    answer_audio = np.concatenate(caller.heard.audio[before:after]).astype(np.float32) / 32768
    text = WhisperTranscriber(str(tiny_en_model_dir)).transcribe(
        (16000, resample(answer_audio, 8000, 16000)), "en"
    )
    # tiny.en on 8 kHz μ-law hears "Paris" as "Carises" now and then: two words of three
    assert sum(word in text.lower() for word in ("paris", "capital", "france")) >= 2, text
    # the turn log has the phone conversation, the caller only as a hash, the story interrupted
    with psycopg.connect(pg_dsn) as conn:
        while True:
            row = conn.execute(
                "SELECT id, channel, caller_ref FROM conversations WHERE caller_ref = %s",
                (caller_ref,),
            ).fetchone()
            turns = (
                conn.execute(
                    "SELECT user_text, interrupted FROM turns WHERE conversation_id = %s "
                    "ORDER BY seq",
                    (row[0],),
                ).fetchall()
                if row
                else []
            )
            if len(turns) >= 2 or time.monotonic() > service_store_flush:
                break
            time.sleep(0.2)
    assert row is not None and row[1] == "phone"
    assert "france" in turns[0][0].lower()
    assert any("story" in t[0].lower() and t[1] for t in turns)


# --- the call's end, each way a line can drop ----------------------------------------------------

LONG_REPLY = " ".join(f"Sentence number {i} is here." for i in range(1, 30))


class CountingStore(InMemoryTurnStore):
    """Counts how often a conversation is ended: the call's end must run once."""

    def __init__(self) -> None:
        super().__init__()
        self.closes = 0

    def close_conversation(self, conversation_id: uuid.UUID, ended_at: Any) -> None:
        self.closes += 1
        super().close_conversation(conversation_id, ended_at)


def long_reply_runtime(store: CountingStore, reply: str = LONG_REPLY) -> Runtime:
    runtime = served_runtime()
    stack = runtime.stacks[runtime.default_persona]
    chat = fakes.FakeChat(reply=reply, token_s=0.0)
    stacks = {runtime.default_persona: dataclasses.replace(stack, chat=chat)}
    return dataclasses.replace(runtime, stacks=stacks, store=store)


def wait_until(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(predicate())


def assert_ended_once_with_the_turn(store: CountingStore, reply: str = LONG_REPLY) -> None:
    assert wait_until(lambda: store.closes > 0, 10), "the call never ended"
    time.sleep(0.5)  # a second end would come now
    assert store.closes == 1
    [turn] = store.turns
    assert turn.interrupted
    assert 0 < len(turn.assistant_text) < len(reply)
    assert list(store.ended) == [turn.conversation_id]


def test_a_twilio_stop_mid_reply_ends_the_call_once_and_records_the_turn(tmp_path: Path) -> None:
    store = CountingStore()
    settings = Settings(data_dir=tmp_path, concurrency_limit=1, time_limit_s=60)
    app = create_app(settings, backend=backend_of(long_reply_runtime(store)))
    with LiveServer(app) as live:

        async def scenario() -> None:
            async with TwilioClient(f"{live.ws}/telephone/handler") as caller:
                assert await caller.wait_for(lambda: caller.heard.marks, 10)  # the greeting
                await caller.speak(to_8k((16000, tone(0.8))))
                frames = caller.heard.media_frames
                # a second of the reply, then the caller hangs up
                assert await caller.wait_for(lambda: caller.heard.media_frames > frames + 50, 10)
                await caller.stop()
                await asyncio.wait_for(caller.heard.closed.wait(), 5)

        asyncio.run(scenario())
        assert_ended_once_with_the_turn(store)


def test_a_websocket_closing_mid_reply_ends_the_call_once_and_records_the_turn(
    tmp_path: Path,
) -> None:
    """FastRTC's own websocket transport (``/websocket/offer``), which never calls the
    handler's ``shutdown``: the call notices the closed socket itself."""
    store = CountingStore()
    settings = Settings(data_dir=tmp_path, concurrency_limit=1, time_limit_s=60)
    app = create_app(settings, backend=backend_of(long_reply_runtime(store)))
    with LiveServer(app) as live:

        async def scenario() -> None:
            received: list[int] = []
            async with connect(f"{live.ws}/websocket/offer") as ws:

                async def read() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        async for raw in ws:
                            if json.loads(raw).get("event") == "media":
                                received.append(1)

                reader = asyncio.create_task(read())
                await ws.send(json.dumps({"event": "start", "websocket_id": uuid.uuid4().hex}))
                speech = np.concatenate([np.zeros(16000), tone(0.8), np.zeros(16000 * 8)])
                t0 = time.monotonic()
                after_speech = None
                for i, start in enumerate(range(0, speech.size, 320)):
                    pcm = (speech[start : start + 320] * 32767).astype(np.int16)
                    payload = base64.b64encode(ulaw_encode(pcm)).decode()
                    await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
                    if after_speech is None and start >= 16000 * 1.8:
                        after_speech = len(received)
                    if after_speech is not None and len(received) > after_speech + 40:
                        break  # the reply is playing: the client goes away
                    await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
                else:
                    raise AssertionError("no reply audio")
                reader.cancel()
            # the socket is closed (a close frame, no "stop")

        asyncio.run(scenario())
        assert_ended_once_with_the_turn(store)
