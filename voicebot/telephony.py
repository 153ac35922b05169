"""Phone calls through Twilio: TwiML, signature checks, and the Media Stream websocket loop.

Twilio calls ``POST …/telephone/incoming``; we answer with TwiML that connects a bidirectional
Media Stream to ``…/telephone/handler``. That websocket carries JSON messages (``connected``,
``start``, ``media`` with 20 ms of base64 8 kHz μ-law, ``mark``, ``dtmf``, ``stop``); we send
``media`` back, ``mark`` to learn when Twilio has played a stretch of speech, and ``clear`` to
drop what Twilio still holds when the caller barges in. Unlike FastRTC's phone handler, a
malformed message is logged and skipped (the call goes on) and ``clear`` is sent.

Threads: the handler's ``start_up``/``shutdown`` and its call's ``receive``/``next_output`` run
in worker threads (``asyncio.to_thread``), never on the event loop. The call is the same
``voicebot.call`` object every transport drives; the handler is only there for the server's
start and end hooks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voicebot.audio import Samples, StreamResampler, resample, to_mono_float32
from voicebot.conversation import Channel

if TYPE_CHECKING:
    from voicebot.call.session import Call
    from voicebot.handler import TurnUpdate, VoiceHandler

logger = logging.getLogger(__name__)

MEDIA_RATE = 8000
MEDIA_FRAME = MEDIA_RATE // 50  # 20 ms
START_TIMEOUT_S = 10.0
"""How long a new Media Stream may take to send ``start``."""
MARK_WAIT_S = 3.0
"""Longest wait for Twilio to confirm it played our last words before we hang up."""
SPEECH_GAP_S = 0.2
"""No audio for this long ends a stretch of speech (and sends a ``mark``)."""
OUTPUT_WAIT_S = 0.01
"""Longest a wait for the call's next output blocks a worker thread."""
LANGUAGE_TAGS = {"en": "en-US", "ja": "ja-JP"}
"""Twilio ``<Say>`` language per persona language."""


# --- μ-law (G.711), in numpy: audioop is deprecated and gone in Python 3.13 --------------------

_BIAS = 0x84


def _decode_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    magnitude = (((u & 0x0F) << 3) + _BIAS) << exponent
    values = np.where(u & 0x80, _BIAS - magnitude, magnitude - _BIAS)
    return values.astype(np.int16)


_ULAW_TO_PCM = _decode_table()


def ulaw_decode(data: bytes) -> npt.NDArray[np.int16]:
    """8-bit μ-law bytes to int16 PCM."""
    return _ULAW_TO_PCM[np.frombuffer(data, dtype=np.uint8)]


_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def ulaw_encode(pcm: npt.NDArray[np.int16]) -> bytes:
    """int16 PCM to 8-bit μ-law bytes (the classic 14-bit g711.c encoder, as audioop did)."""
    value = pcm.astype(np.int32) >> 2
    negative = value < 0
    magnitude = np.minimum(np.abs(value), 8159) + (_BIAS >> 2)
    segment = np.searchsorted(_SEG_END, magnitude, side="left")
    mask = np.where(negative, 0x7F, 0xFF)
    code = (np.minimum(segment, 7) << 4) | ((magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code) ^ mask
    encoded: bytes = code.astype(np.uint8).tobytes()
    return encoded


def encode_media(samples: Samples) -> str:
    """Mono float32 at 8 kHz to a Media Stream payload (base64 μ-law)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    return base64.b64encode(ulaw_encode(pcm)).decode("ascii")


def decode_media(payload: str) -> npt.NDArray[np.int16]:
    """A Media Stream payload to int16 PCM at 8 kHz; raises ValueError when it is not base64."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, TypeError) as e:
        raise ValueError(f"media payload is not base64: {e}") from e
    return ulaw_decode(data)


# --- TwiML, signatures, caller privacy ---------------------------------------------------------


def twiml_connect(stream_url: str, parameters: Mapping[str, str]) -> str:
    """TwiML that connects the call to our Media Stream websocket, passing ``parameters``."""
    from twilio.twiml.voice_response import Connect, VoiceResponse

    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def twiml_busy(message: str, language: str) -> str:
    """TwiML that says ``message`` (Twilio's own voice) and hangs up."""
    from twilio.twiml.voice_response import VoiceResponse

    response = VoiceResponse()
    if message:
        response.say(message, language=LANGUAGE_TAGS.get(language, "en-US"))
    response.hangup()
    return str(response)


class SignatureChecker:
    """Checks ``X-Twilio-Signature`` with the account's auth token (twilio's validator)."""

    def __init__(self, auth_token: str) -> None:
        from twilio.request_validator import RequestValidator

        self._validator = RequestValidator(auth_token)

    def valid(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        if not signature:
            return False
        return bool(self._validator.validate(url, dict(params), signature))

    def sign(self, url: str, params: Mapping[str, str]) -> str:
        """The signature Twilio would send (for tests and local tools)."""
        return str(self._validator.compute_signature(url, dict(params)))


def caller_hash(number: str, salt: bytes) -> str:
    """A salted hash of a phone number: the same caller maps to the same value, the number
    itself is never stored."""
    digest = hmac.new(salt, number.strip().encode(), hashlib.sha256).hexdigest()
    return f"h:{digest[:32]}"


def load_salt(configured: str | None, path: Path) -> bytes:
    """The configured salt, or a random one created once and kept at ``path`` (mode 0600).

    Creation is atomic: the salt is written to a private temporary file that is then linked
    into place, so a process racing us either wins or reads the winner's complete salt. (A
    service with a turn log keeps the salt in the database instead, shared by every replica.)
    """
    if configured:
        return configured.encode()
    try:
        existing = path.read_bytes()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(candidate, path)  # fails if another process got there first: theirs wins
    except FileExistsError:
        if not path.read_bytes():  # left empty by an older version's race: replace it
            logger.warning("caller-hash salt file %s was empty; replacing it", path)
            os.replace(candidate, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
    return path.read_bytes()


# --- binding a Media Stream to the call just answered ------------------------------------------

TICKET_TTL_S = 60.0
"""How long Twilio has to open the Media Stream after we answered the call."""
CALL_MEMORY_S = 24 * 3600.0
"""How long an answered CallSid is remembered, so a replayed webhook gets no second stream."""


@dataclass(frozen=True)
class TicketRecord:
    """What a ticket was issued for: the stream takes these, not its unsigned parameters."""

    call_sid: str | None
    persona: str
    caller: str | None
    expires_at: float


class StreamTickets:
    """One-time, short-lived tickets that bind a Media Stream to a call we just answered.

    ``POST /telephone/incoming`` (signature-checked) issues one and puts it in the TwiML as a
    ``<Parameter>``; the stream's ``start`` message must bring it back, within ``ttl_s``, once,
    for the same CallSid. Twilio signs the handshake URL but not the parameters, and the same
    signature works forever: the ticket is what makes a stream belong to one answered call.
    A CallSid is answered once (remembered ``call_memory_s``, at most ``max_calls``), so a
    replayed webhook gets no ticket.
    """

    def __init__(
        self,
        *,
        ttl_s: float = TICKET_TTL_S,
        call_memory_s: float = CALL_MEMORY_S,
        max_pending: int = 10_000,
        max_calls: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._call_memory_s = call_memory_s
        self._max_pending = max_pending
        self._max_calls = max_calls
        self._clock = clock
        self._pending: dict[str, TicketRecord] = {}
        self._answered: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, call_sid: str | None, persona: str, caller: str | None) -> str | None:
        """A ticket for the call's stream; None when that CallSid was answered already (a
        replay) or too many tickets wait (the webhook is being flooded)."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            if call_sid is not None:
                if call_sid in self._answered:
                    return None
                self._answered[call_sid] = now
                while len(self._answered) > self._max_calls:
                    self._answered.popitem(last=False)
            if len(self._pending) >= self._max_pending:
                return None
            ticket = secrets.token_urlsafe(24)
            self._pending[ticket] = TicketRecord(call_sid, persona, caller, now + self._ttl_s)
            return ticket

    def redeem(self, ticket: str | None, call_sid: str | None) -> TicketRecord | None:
        """The ticket's record, once; None when it is unknown, expired, used, or was issued
        for another call."""
        if not ticket:
            return None
        now = self._clock()
        with self._lock:
            record = self._pending.pop(ticket, None)
        if record is None or record.expires_at < now:
            return None
        if record.call_sid is not None and record.call_sid != call_sid:
            return None
        return record

    def _prune(self, now: float) -> None:
        for ticket in [t for t, r in self._pending.items() if r.expires_at < now]:
            del self._pending[ticket]
        while self._answered and next(iter(self._answered.values())) < now - self._call_memory_s:
            self._answered.popitem(last=False)


# --- the Media Stream call ---------------------------------------------------------------------


class Slots(Protocol):
    """The server's call limit, shared by every channel."""

    def try_acquire(self, channel: Channel) -> bool:
        """Take a slot; False when every line is busy."""
        ...

    def release(self, channel: Channel) -> None: ...


@dataclass(frozen=True)
class StreamStart:
    """What Twilio's ``start`` message told us."""

    stream_sid: str
    call_sid: str | None
    parameters: Mapping[str, str]


class PhoneCall:
    """One Twilio Media Stream, driving one VoiceHandler until either side hangs up."""

    def __init__(
        self,
        websocket: WebSocket,
        *,
        new_handler: Callable[[str | None, str | None], VoiceHandler],
        busy_line: Callable[[str | None], tuple[str, Any]],
        slots: Slots,
        time_limit_s: float | None,
        grace_s: float = 20.0,
        on_start: Callable[[str], None] | None = None,
        on_update: Callable[[str, TurnUpdate], None] | None = None,
        on_end: Callable[[str], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
        admit: Callable[[StreamStart], Mapping[str, str] | None] | None = None,
    ) -> None:
        self.ws = websocket
        self._new_handler = new_handler
        self._busy_line = busy_line
        self._slots = slots
        self._time_limit_s = time_limit_s
        self._grace_s = grace_s
        self._on_start = on_start
        self._on_update = on_update
        self._on_end = on_end
        self._on_reject = on_reject
        self._admit = admit
        """Checks ``start`` (its ticket) and returns the parameters to trust, or None."""
        self._send_lock = asyncio.Lock()
        self._marks_pending: dict[str, asyncio.Event] = {}
        self._mark_count = 0
        self.stream_sid: str | None = None
        self.skipped = 0
        """Malformed or unexpected messages skipped so far."""

    async def run(self) -> None:
        """Accept the websocket and serve the call; returns when it is over."""
        await self.ws.accept()
        try:
            start = await asyncio.wait_for(self._wait_for_start(), START_TIMEOUT_S)
        except (TimeoutError, WebSocketDisconnect):
            start = None
        if start is None:
            logger.warning("media stream closed or silent before its start message")
            await self._close()
            return
        self.stream_sid = start.stream_sid
        if self._admit is not None:
            trusted = self._admit(start)
            if trusted is None:
                if self._on_reject is not None:
                    self._on_reject("bad_ticket")
                await self._close(code=1008)
                return
            start = dataclasses.replace(start, parameters=dict(trusted))
        persona = start.parameters.get("persona") or None
        if not self._slots.try_acquire("phone"):
            logger.warning("phone call refused: every line is busy")
            if self._on_reject is not None:
                self._on_reject("busy")
            await self._say_busy_and_hang_up(persona)
            return
        try:
            await self._serve(start, persona)
        finally:
            self._slots.release("phone")

    # -- receiving

    async def _receive(self) -> dict[str, Any] | None:
        """The next well-formed message; None when the socket is gone. Bad ones are skipped."""
        while True:
            try:
                text = await self.ws.receive_text()
            except WebSocketDisconnect:
                return None
            except (RuntimeError, KeyError):  # a binary frame, or the socket already closed
                if self.ws.application_state != WebSocketState.CONNECTED or (
                    self.ws.client_state != WebSocketState.CONNECTED
                ):
                    return None
                self._skip("a non-text frame")
                continue
            try:
                message = json.loads(text)
            except ValueError:
                self._skip(f"invalid JSON {text[:80]!r}")
                continue
            if not isinstance(message, dict) or not isinstance(message.get("event"), str):
                self._skip(f"a message without an event: {text[:80]!r}")
                continue
            return message

    def _skip(self, what: str) -> None:
        self.skipped += 1
        logger.warning("media stream %s: skipping %s", self.stream_sid or "?", what)

    async def _wait_for_start(self) -> StreamStart | None:
        while (message := await self._receive()) is not None:
            event = message["event"]
            if event == "start":
                raw = message.get("start")
                start: dict[str, Any] = raw if isinstance(raw, dict) else {}
                sid = message.get("streamSid") or start.get("streamSid")
                if not isinstance(sid, str) or not sid:
                    self._skip("a start message without a streamSid")
                    continue
                params = start.get("customParameters")
                parameters = (
                    {str(k): str(v) for k, v in params.items()} if isinstance(params, dict) else {}
                )
                call_sid = start.get("callSid")
                return StreamStart(sid, call_sid if isinstance(call_sid, str) else None, parameters)
            if event == "stop":
                return None
            if event != "connected":
                self._skip(f"a {event!r} message before start")
        return None

    # -- sending

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    async def _send_media(self, samples: Samples) -> None:
        await self._send(
            {
                "event": "media",
                "streamSid": self.stream_sid,
                "media": {"payload": encode_media(samples)},
            }
        )

    async def _mark(self, name: str | None = None) -> asyncio.Event:
        self._mark_count += 1
        name = name or f"speech-{self._mark_count}"
        heard = self._marks_pending.setdefault(name, asyncio.Event())
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
        return heard

    async def _clear(self) -> None:
        with contextlib.suppress(Exception):  # the socket may be closing
            await self._send({"event": "clear", "streamSid": self.stream_sid})
            logger.info("media stream %s: barge-in, sent clear", self.stream_sid)

    def _mark_heard(self, message: dict[str, Any]) -> None:
        mark = message.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        event = self._marks_pending.pop(name, None) if isinstance(name, str) else None
        if event is not None:
            event.set()

    async def _close(self, code: int = 1000) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code=code)

    async def _say_busy_and_hang_up(self, persona: str | None) -> None:
        """Speak the persona's busy message in its own voice, wait until played, hang up."""
        text, synthesizer = self._busy_line(persona)
        try:
            if text and synthesizer is not None:
                audio = await asyncio.to_thread(_synthesize_8k, synthesizer, text)
                for start in range(0, audio.size, MEDIA_FRAME):
                    await self._send_media(audio[start : start + MEDIA_FRAME])
                heard = await self._mark("busy")
                await self._wait_heard(heard, audio.size / MEDIA_RATE + MARK_WAIT_S)
        except Exception:
            logger.exception("could not say the busy message")
        await self._close()

    async def _wait_heard(self, heard: asyncio.Event, timeout_s: float) -> None:
        """Wait for a mark's echo while still reading (and discarding) the caller's audio."""

        async def drain() -> None:
            while not heard.is_set():
                message = await self._receive()
                if message is None or message["event"] == "stop":
                    return
                if message["event"] == "mark":
                    self._mark_heard(message)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain(), timeout_s)

    # -- the call

    async def _serve(self, start: StreamStart, persona: str | None) -> None:
        sid = start.stream_sid
        handler = self._new_handler(persona, start.parameters.get("caller") or None)
        handler.phone_mode = True
        loop = asyncio.get_running_loop()

        def on_interrupt() -> None:  # on a pipeline thread
            loop.call_soon_threadsafe(lambda: loop.create_task(self._clear()))

        handler.on_interrupt = on_interrupt
        if self._on_start is not None:
            self._on_start(sid)
        logger.info("phone call %s (stream %s) connected", start.call_sid or "?", sid)
        await asyncio.to_thread(handler.start_up)
        reader = asyncio.create_task(self._read_loop(handler.call), name=f"twilio-read-{sid}")
        player = asyncio.create_task(self._play_loop(handler.call), name=f"twilio-play-{sid}")
        limit = None if self._time_limit_s is None else self._time_limit_s + self._grace_s
        try:
            done, _ = await asyncio.wait(
                {reader, player}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                logger.warning("phone call %s: over its time limit and grace; hanging up", sid)
        finally:
            for task in (reader, player):
                task.cancel()
            for task in (reader, player):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await asyncio.to_thread(handler.shutdown)
            await self._close()
            if self._on_end is not None:
                self._on_end(sid)
            logger.info("phone call %s ended (%d bad messages skipped)", sid, self.skipped)

    async def _read_loop(self, call: Call) -> None:
        while (message := await self._receive()) is not None:
            event = message["event"]
            if event == "media":
                media = message.get("media")
                payload = media.get("payload") if isinstance(media, dict) else None
                if not isinstance(payload, str):
                    self._skip("a media message without a payload")
                    continue
                try:
                    pcm = decode_media(payload)
                except ValueError as e:
                    self._skip(str(e))
                    continue
                if pcm.size == 0:
                    continue
                try:
                    await asyncio.to_thread(call.receive, (MEDIA_RATE, pcm))
                except Exception:  # a bug in a stage must not end the call
                    logger.exception("media stream %s: receive failed", self.stream_sid)
            elif event == "mark":
                self._mark_heard(message)
            elif event == "stop":
                return
            elif event in ("dtmf", "connected", "start"):
                logger.debug("media stream %s: %s ignored", self.stream_sid, event)
            else:
                self._skip(f"an unexpected {event!r} message")

    async def _play_loop(self, call: Call) -> None:
        from voicebot.call.events import AudioOut, CloseCall, TurnUpdate

        down: StreamResampler | None = None
        last_audio: float | None = None
        while True:
            out = await asyncio.to_thread(call.next_output, OUTPUT_WAIT_S)
            if isinstance(out, AudioOut):
                rate, samples = to_mono_float32((out.rate, out.samples))
                if down is None or down.from_rate != rate:
                    down = StreamResampler(rate, MEDIA_RATE)
                await self._send_media(down(samples))
                last_audio = time.monotonic()
            elif isinstance(out, CloseCall):
                # The handler said its last words (time limit): let Twilio play them, hang up.
                heard = await self._mark("goodbye")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(heard.wait(), MARK_WAIT_S)
                return
            else:
                if isinstance(out, TurnUpdate) and self._on_update is not None:
                    if self.stream_sid is not None:
                        self._on_update(self.stream_sid, out)
                if last_audio is not None and time.monotonic() - last_audio > SPEECH_GAP_S:
                    last_audio = None
                    await self._mark()


def _synthesize_8k(synthesizer: Any, text: str) -> Samples:
    pieces = [
        resample(to_mono_float32((rate, samples))[1], rate, MEDIA_RATE)
        for rate, samples in synthesizer.synthesize(text)
    ]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
