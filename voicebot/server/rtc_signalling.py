"""FastRTC's signalling, made safe for a served line limit.

This is the only module that touches FastRTC's (0.0.34) signalling internals: the connection
maps of a ``Stream`` or of the page's WebRTC component (``pcs``, ``connections``, ``handlers``,
``data_channels``, ``additional_outputs``, ``connection_timeouts``), its ``WebSocketHandler``
and the component's ``handle_offer``; and of the aiortc peer connection FastRTC makes, the
audio receiver's jitter buffer. What it fixes:

- An offer is checked before FastRTC sees it (``check_offer``, ``check_sdp``): FastRTC adds
  the connection to ``pcs`` before ``setRemoteDescription`` can fail, and schedules no cleanup
  when it does.
- Any failure while answering an offer removes every trace of it (``answer_offer``).
- The server learns when a WebRTC connection is over (``answer_offer``'s ``on_closed``), with
  the handler FastRTC made for it, whichever way it ended.
- The caller's audio reaches the call as soon as each packet arrives (``unbuffer_input``):
  aiortc's receiver holds 4 packets (80 ms) in a playout jitter buffer, which nothing here
  plays; the VAD takes frames whenever they come. Our handler is tuned for the track too
  (``tune_for_webrtc``: input frame by frame, output at Opus's 48 kHz).
- ``serve_websocket`` replaces ``Stream.websocket_offer``: bad JSON and malformed messages are
  skipped (logged once per connection), only the first ``start`` counts, a client that never
  sends ``start`` is closed, the call has a hard time limit, FastRTC's own limit check (which
  runs after ``start_up`` and never shuts the rejected handler down) is not used, and the
  stream's maps are cleaned when the socket ends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = 200
MAX_SDP_BYTES = 60_000

OfferKind = Literal["offer", "ice-candidate"]
SetOutputs = Callable[[Any], None]
OfferAnswerer = Callable[[dict[str, Any], SetOutputs], Awaitable[Any]]

_MAPS = (
    "pcs",
    "connections",
    "handlers",
    "data_channels",
    "additional_outputs",
    "connection_timeouts",
)


class OfferError(ValueError):
    """An offer we will not (or could not) answer; the message says why, for the client."""


# --- offers ------------------------------------------------------------------------------------


def check_offer(body: Mapping[str, Any]) -> OfferKind:
    """What ``body`` asks for (its id and type checked); OfferError when it makes no sense."""
    webrtc_id = body.get("webrtc_id")
    if not isinstance(webrtc_id, str) or not webrtc_id or len(webrtc_id) > MAX_ID_LENGTH:
        raise OfferError(f"webrtc_id must be a non-empty string of at most {MAX_ID_LENGTH} chars")
    kind = body.get("type")
    if kind == "ice-candidate":
        if not isinstance(body.get("candidate"), dict):
            raise OfferError("an ice-candidate message needs a 'candidate' object")
        return "ice-candidate"
    if kind != "offer":
        raise OfferError(f"type must be 'offer' or 'ice-candidate', not {kind!r}")
    return "offer"


def check_sdp(body: Mapping[str, Any]) -> None:
    """OfferError unless ``body`` carries an SDP offer FastRTC can use."""
    sdp = body.get("sdp")
    if not isinstance(sdp, str):
        raise OfferError("an offer needs its SDP as a string in 'sdp'")
    if len(sdp) > MAX_SDP_BYTES:
        raise OfferError(f"the SDP is over {MAX_SDP_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0") or "a=ice-ufrag:" not in sdp or "\nm=" not in sdp:
        raise OfferError("not an SDP offer: it needs 'v=0', a media section and an ice-ufrag")


def connection_known(mixin: Any, webrtc_id: str) -> bool:
    """Whether FastRTC holds anything for ``webrtc_id``."""
    return any(webrtc_id in getattr(mixin, name) for name in ("pcs", "connections", "handlers"))


def open_entries(mixin: Any) -> dict[str, int]:
    """How many entries each of FastRTC's connection maps holds (all 0 when idle)."""
    return {name: len(getattr(mixin, name)) for name in _MAPS}


async def discard(mixin: Any, webrtc_id: str) -> None:
    """Close ``webrtc_id``'s peer connection and drop it from every map."""
    pc = mixin.pcs.pop(webrtc_id, None)
    if pc is not None:
        with contextlib.suppress(Exception):
            await pc.close()
    with contextlib.suppress(Exception):
        for conn in mixin.clean_up(webrtc_id):
            with contextlib.suppress(Exception):
                conn.stop()


async def close_connection(mixin: Any, webrtc_id: str) -> None:
    """End a live WebRTC connection from our side (its ``connectionstatechange`` cleans up)."""
    pc = mixin.pcs.get(webrtc_id)
    if pc is None:
        await discard(mixin, webrtc_id)
        return
    with contextlib.suppress(Exception):
        await pc.close()


class ArrivalOrderBuffer:
    """Stands in for aiortc's audio ``JitterBuffer`` on the server: each packet newer than the
    last goes to the decoder as it arrives; a late or repeated one is dropped.

    aiortc's buffer (``JitterBuffer(capacity=16, prefetch=4)``) releases a frame only once the
    4 packets after it are in: 80 ms at 20 ms a packet, a cushion for playing audio out evenly.
    The call does not play its input; its VAD takes frames whenever they come. The buffer does
    not cover losses either: a missing packet stalls it until 16 more have arrived.
    """

    capacity = 16

    def __init__(self) -> None:
        self._last: int | None = None

    def add(self, packet: Any) -> tuple[bool, Any]:
        """``(picture lost?, encoded frame or None)``, as aiortc's ``JitterBuffer.add``."""
        from aiortc.jitterbuffer import JitterFrame

        sequence = int(packet.sequence_number)
        if self._last is not None and not 0 < (sequence - self._last) % 65536 < 32768:
            return False, None
        self._last = sequence
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_missing_buffer_logged = False


def unbuffer_input(pc: Any) -> bool:
    """Give ``pc``'s audio receivers an ``ArrivalOrderBuffer``; call before media flows (the
    answer not yet sent). False (logged once) when this aiortc keeps its buffer elsewhere."""
    global _missing_buffer_logged
    done = False
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or receiver is None:
            continue
        if not hasattr(receiver, _JITTER_BUFFER):
            if not _missing_buffer_logged:
                _missing_buffer_logged = True
                logger.warning(
                    "aiortc's receiver has no %s: WebRTC input keeps its 80 ms buffer",
                    _JITTER_BUFFER,
                )
            return False
        setattr(receiver, _JITTER_BUFFER, ArrivalOrderBuffer())
        done = True
    return done


async def answer_offer(
    mixin: Any,
    body: dict[str, Any],
    set_outputs: SetOutputs,
    *,
    on_closed: Callable[[Any], None],
    answer: OfferAnswerer | None = None,
    low_latency: bool = True,
) -> dict[str, Any]:
    """FastRTC's answer to a checked offer; ``on_closed(handler)`` runs once when the connection
    is over (closed, failed, or never connected). Raises OfferError and leaves nothing behind
    when FastRTC fails or refuses. ``low_latency``: ``unbuffer_input``, and a handler with
    ``tune_for_webrtc`` is tuned (its track starts only once the caller has the answer)."""
    webrtc_id = body["webrtc_id"]
    answer = answer or mixin.handle_offer

    def live_outputs(outputs: Any) -> None:
        # FastRTC's output map is a defaultdict: an update the call sends as it ends (its last
        # status, the final turn), after FastRTC cleaned the connection up, would make a new
        # entry that nothing ever removes. Only a live connection's outputs are kept.
        if webrtc_id in mixin.pcs:
            set_outputs(outputs)

    try:
        reply = await answer(body, live_outputs)
    except Exception as e:
        await discard(mixin, webrtc_id)
        raise OfferError(f"could not answer this offer: {type(e).__name__}: {e}") from e
    if not isinstance(reply, dict) or "sdp" not in reply:
        # FastRTC's refusals come back as a 200 JSONResponse with status: failed.
        detail = getattr(reply, "body", b"") or b""
        await discard(mixin, webrtc_id)
        raise OfferError(f"FastRTC refused the offer: {bytes(detail).decode(errors='replace')}")
    pc = mixin.pcs.get(webrtc_id)
    handler = mixin.handlers.get(webrtc_id)
    if pc is None:  # closed while we answered
        on_closed(handler)
        return reply
    if low_latency:
        unbuffer_input(pc)
        if hasattr(handler, "tune_for_webrtc"):
            handler.tune_for_webrtc()
    done = False

    def finish() -> None:
        nonlocal done
        if not done:
            done = True
            on_closed(handler)

    @pc.on("connectionstatechange")  # type: ignore[untyped-decorator]
    def _state() -> None:
        if pc.connectionState in ("closed", "failed"):
            finish()

    if pc.connectionState in ("closed", "failed"):
        finish()
    return reply


def guard_component_offers(component: Any, admit: Callable[..., Awaitable[Any]]) -> None:
    """Route the page's WebRTC offers through ``admit(component, body, set_outputs, original)``
    (the Gradio component calls its own ``handle_offer``, outside our routes)."""
    original = component.handle_offer

    async def handle_offer(body: dict[str, Any], set_outputs: SetOutputs) -> Any:
        return await admit(component, body, set_outputs, original)

    component.handle_offer = handle_offer


# --- websockets --------------------------------------------------------------------------------


@dataclass
class WebSocketCall:
    """What ``serve_websocket`` learnt of one socket."""

    stream_id: str | None = None
    skipped: int = 0
    timed_out: bool = False


class _GuardedSocket:
    """The websocket as FastRTC's WebSocketHandler sees it: only well-formed messages, one
    ``start``, and a ``stop`` when the handler is done (FastRTC waits on the socket otherwise)."""

    def __init__(
        self,
        websocket: Any,
        quit_events: tuple[asyncio.Event, ...],
        call: WebSocketCall,
        *,
        start_timeout_s: float,
        known: Callable[[str], bool],
    ) -> None:
        self._ws = websocket
        self._quit_events = quit_events
        self._call = call
        self._start_timeout_s = start_timeout_s
        self._known = known
        self._quit_wait: asyncio.Task[Any] | None = None
        self._gone = False
        self._started = False
        self._deadline = asyncio.get_running_loop().time() + start_timeout_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    def _skip(self, what: str) -> None:
        self._call.skipped += 1
        if self._call.skipped == 1:
            logger.warning(
                "websocket %s: skipping %s (further bad messages are counted, not logged)",
                self._call.stream_id or "?",
                what,
            )

    async def _next_text(self) -> str | None:
        """The next text frame; None when the call should stop (quit, or no start in time)."""
        if self._quit_wait is None:
            self._quit_wait = asyncio.ensure_future(_first_of(self._quit_events))
        while True:
            timeout = None
            if not self._started:
                timeout = max(0.0, self._deadline - asyncio.get_running_loop().time())
            receiving = asyncio.ensure_future(self._ws.receive())
            try:
                done, _ = await asyncio.wait(
                    {receiving, self._quit_wait},
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            except BaseException:
                receiving.cancel()
                raise
            if receiving not in done:
                receiving.cancel()
                if not self._quit_wait.done():
                    logger.warning(
                        "websocket closed: no start message within %.0f s", self._start_timeout_s
                    )
                return None
            message = receiving.result()
            if message["type"] == "websocket.disconnect":
                from fastapi import WebSocketDisconnect

                raise WebSocketDisconnect(message.get("code", 1000))
            text = message.get("text")
            if text is None:
                self._skip("a binary frame")
                continue
            return str(text)

    async def receive_json(self) -> dict[str, Any]:
        while True:
            text = await self._next_text()
            if text is None:
                return {"event": "stop"}
            try:
                message = json.loads(text)
            except ValueError:
                self._skip(f"invalid JSON {text[:60]!r}")
                continue
            event = message.get("event") if isinstance(message, dict) else None
            if not isinstance(event, str):
                self._skip("a message without an event")
                continue
            if event == "media" and not _valid_media(message):
                self._skip("a media message without a base64 payload")
                continue
            if event == "start":
                sid = message.get("websocket_id")
                if self._started:
                    self._skip("a second start message")
                    continue
                if not isinstance(sid, str) or not sid or len(sid) > MAX_ID_LENGTH:
                    self._skip("a start message without a websocket_id")
                    continue
                if self._known(sid):
                    logger.warning("websocket refused: connection id %s is in use", sid)
                    with contextlib.suppress(Exception):
                        await self._ws.send_json(
                            {"status": "failed", "meta": {"error": "connection_already_exists"}}
                        )
                    return {"event": "stop"}
                self._started = True
                self._call.stream_id = sid
            checked: dict[str, Any] = message
            return checked

    async def send_json(self, data: Any, mode: str = "text") -> None:
        """Send, or note quietly that the client is gone (FastRTC prints a traceback per frame
        otherwise) and end the call."""
        if self._gone:
            return
        try:
            await self._ws.send_json(data, mode)
        except Exception:  # WebSocketDisconnect, or a send after the close
            self._gone = True
            logger.debug("websocket %s: the client is gone", self._call.stream_id or "?")
            self._quit_events[0].set()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close, unless the socket is already closed (FastRTC closes it once more)."""
        with contextlib.suppress(Exception):
            await self._ws.close(code, reason)

    def close_waiter(self) -> None:
        if self._quit_wait is not None:
            self._quit_wait.cancel()


async def _first_of(events: tuple[asyncio.Event, ...]) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _valid_media(message: dict[str, Any]) -> bool:
    media = message.get("media")
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str):
        return False
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


async def serve_websocket(
    stream: Any,
    websocket: Any,
    handler: Any,
    *,
    start_timeout_s: float,
    hard_limit_s: float | None,
    stop: asyncio.Event | None = None,
    on_start: Callable[[str], None] | None = None,
) -> WebSocketCall:
    """Run one ``/websocket/offer`` call with ``handler`` until either side ends it, ``stop``
    is set, or ``hard_limit_s`` passes. The caller shuts the handler down afterwards; the
    stream's maps hold nothing of this call when this returns."""
    from fastrtc.websocket import WebSocketHandler
    from starlette.websockets import WebSocketDisconnect

    handler.phone_mode = False
    if hasattr(handler, "tune_for_websocket"):
        handler.tune_for_websocket()
    call = WebSocketCall()

    async def set_handler(stream_id: str, ws_handler: Any) -> None:
        stream.connections[stream_id] = [ws_handler]
        if on_start is not None:
            on_start(stream_id)

    ws_handler = WebSocketHandler(
        handler,
        set_handler,
        lambda stream_id: None,
        lambda stream_id: stream.set_additional_outputs(stream_id),
    )
    ws_handler.start_up_task = None  # type: ignore[assignment]  # read in its `finally`
    guarded = _GuardedSocket(
        websocket,
        (ws_handler.quit, stop or asyncio.Event()),
        call,
        start_timeout_s=start_timeout_s,
        known=lambda sid: connection_known(stream, sid),
    )
    try:
        await asyncio.wait_for(
            ws_handler.handle_websocket(guarded),  # type: ignore[arg-type]
            hard_limit_s,
        )
    except TimeoutError:
        call.timed_out = True
        logger.warning("websocket %s: over its hard time limit; closed", call.stream_id or "?")
        with contextlib.suppress(Exception):
            await websocket.close()
    except WebSocketDisconnect:
        logger.debug("websocket %s: the client left first", call.stream_id or "?")
    except Exception:
        logger.exception("websocket %s failed", call.stream_id or "?")
        with contextlib.suppress(Exception):
            await websocket.close()
    finally:
        guarded.close_waiter()
        ws_handler.quit.set()
        start_up = getattr(ws_handler, "start_up_task", None)
        if start_up is not None:
            # start_up runs in a worker thread: wait for it, so shutting down comes after it.
            await asyncio.gather(start_up, return_exceptions=True)
        if call.stream_id is not None:
            stream.connections.pop(call.stream_id, None)
            outputs = stream.additional_outputs.pop(call.stream_id, None)
            if outputs is not None:
                outputs.quit.set()
    if call.skipped:
        logger.info("websocket %s: %d bad messages skipped", call.stream_id or "?", call.skipped)
    return call


__all__ = [
    "ArrivalOrderBuffer",
    "OfferError",
    "WebSocketCall",
    "answer_offer",
    "check_offer",
    "check_sdp",
    "close_connection",
    "connection_known",
    "discard",
    "guard_component_offers",
    "open_entries",
    "serve_websocket",
    "unbuffer_input",
]
