"""Who gets in: the guard under root paths, loopback-only serving without a token, bad query
values, and Twilio media streams bound to the call just answered."""

from __future__ import annotations

import asyncio
import re
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from websockets.exceptions import InvalidStatus

from tests import fakes
from tests.support_served import LiveServer, backend_of, served_runtime
from tests.test_telephony import TwilioClient
from voicebot.conversation import Conversation, Turn
from voicebot.runtime import PersonaStack, Runtime
from voicebot.server import create_app, mount
from voicebot.server.access import (
    StoredConversation,
    exposure_of,
    resume_refusal,
    route_path,
)
from voicebot.server.app import create_page_app
from voicebot.server.service import services_of
from voicebot.settings import Settings
from voicebot.telephony import SignatureChecker, StreamTickets, caller_hash
from voicebot.turns import TurnConfig

TOKEN = "access-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- the guard matches what the router matches -------------------------------------------------


def test_route_path_strips_the_root_path_like_starlette() -> None:
    assert route_path({"path": "/x/voice/api", "root_path": "/x"}) == "/voice/api"
    assert route_path({"path": "/voice/api", "root_path": "/x"}) == "/voice/api"
    assert route_path({"path": "/xy/voice", "root_path": "/x"}) == "/xy/voice"
    assert route_path({"path": "/x", "root_path": "/x"}) == ""


def _token_settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(data_dir=tmp_path, api_token=TOKEN, **extra)


def test_mount_under_a_fastapi_root_path_needs_the_token(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastAPI deprecates root_path=; people still use it
        app = FastAPI(root_path="/x")
    mount(app, "/voice", settings=_token_settings(tmp_path), backend=backend_of(served_runtime()))
    with TestClient(app) as client:
        for path in ("/x/voice/api/personas", "/voice/api/personas", "/x/voice/metrics"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=AUTH).status_code == 200, path
        assert client.get("/x/voice/healthz").status_code == 200


def test_mount_and_create_app_under_uvicorn_root_path_need_the_token(tmp_path: Path) -> None:
    app = FastAPI()
    mount(app, "/voice", settings=_token_settings(tmp_path), backend=backend_of(served_runtime()))
    with LiveServer(app, root_path="/x") as live, httpx.Client(base_url=live.http) as http:
        assert http.get("/voice/api/personas").status_code == 401
        assert http.get("/voice/api/personas", headers=AUTH).status_code == 200
        assert http.get("/voice/healthz").status_code == 200
    settings = _token_settings(tmp_path, twilio_auth_token="twilio-secret")
    whole = create_app(settings, backend=backend_of(served_runtime()))
    with LiveServer(whole, root_path="/x") as live, httpx.Client(base_url=live.http) as http:
        assert http.get("/api/personas").status_code == 401
        assert http.get("/healthz").status_code == 200  # health stays open under a root path
        # Twilio's route is recognised under the root path: its signature, over the public URL
        url = f"{live.http}/x/telephone/incoming"
        form = {"CallSid": "CA9", "From": "+15550000001", "To": "+15550000002"}
        signature = SignatureChecker("twilio-secret").sign(url, form)
        assert http.post("/telephone/incoming", data=form).status_code == 403
        answered = http.post(
            "/telephone/incoming", data=form, headers={"X-Twilio-Signature": signature}
        )
        assert answered.status_code == 200, answered.text
        assert f"ws://127.0.0.1:{live.port}/x/telephone/handler".replace("ws:", "wss:") in (
            answered.text
        )


# --- without a token: this machine only, checked on each request ------------------------------


def test_exposure_is_judged_per_request() -> None:
    local = {"server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5), "headers": []}
    assert exposure_of(local) is None
    assert exposure_of({**local, "server": ("192.0.2.7", 80)}) == "it arrived on 192.0.2.7"
    assert exposure_of({**local, "client": ("198.51.100.1", 5)}) == "it came from 198.51.100.1"
    proxied = {**local, "headers": [(b"x-forwarded-for", b"198.51.100.1")]}
    assert exposure_of(proxied) == "it came through a proxy"
    assert exposure_of({"server": None, "client": None, "headers": []}) is None  # unix socket
    assert exposure_of({**local, "client": ("::ffff:127.0.0.1", 5)}) is None  # dual stack


def test_a_mount_without_token_answers_only_on_loopback(tmp_path: Path) -> None:
    # settings.host says nothing about where the host app listens: mount() does not read it
    app = FastAPI()
    mount(
        app, "/v", settings=Settings(data_dir=tmp_path, host="0.0.0.0"), backend=None
    )  # no lifespan here: only the guard answers

    async def get(base: str, client: tuple[str, int], **headers: str) -> int:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=base) as http:
            return (await http.get("/v/api/personas", headers=headers)).status_code

    assert asyncio.run(get("http://192.0.2.7", ("192.0.2.8", 1))) == 403
    assert asyncio.run(get("http://127.0.0.1", ("192.0.2.8", 1))) == 403
    assert asyncio.run(get("http://127.0.0.1", ("127.0.0.1", 1), **{"X-Forwarded-For": "a"})) == 403
    with pytest.raises(RuntimeError, match="not started"):  # the guard let it through
        asyncio.run(get("http://127.0.0.1", ("127.0.0.1", 1)))


# --- bad query values -------------------------------------------------------------------------


def test_bad_query_values_get_422_not_500(tmp_path: Path, pg_dsn: str) -> None:
    app = create_app(Settings(data_dir=tmp_path), backend=backend_of(served_runtime(), pg_dsn))
    cid = uuid.uuid4()
    with TestClient(app, raise_server_exceptions=False) as client:
        for path, params in (
            ("/api/conversations", {"limit": -1}),
            ("/api/conversations", {"limit": 0}),
            ("/api/conversations", {"limit": 10**9}),
            ("/api/conversations", {"limit": "many"}),
            (f"/api/conversations/{cid}", {"limit": -1}),
            (f"/api/conversations/{cid}/events", {"backlog": -5}),
            ("/api/conversations/not-a-uuid", {}),
        ):
            reply = client.get(path, params=params)
            assert reply.status_code == 422, (path, params, reply.status_code)
            assert "detail" in reply.json()
        assert client.get("/api/conversations", params={"limit": 3}).status_code == 200


# --- Twilio: a stream belongs to the call just answered -----------------------------------------


def test_stream_tickets_are_one_time_short_lived_and_per_call() -> None:
    now = [0.0]
    tickets = StreamTickets(ttl_s=60, call_memory_s=3600, max_pending=3, clock=lambda: now[0])
    first = tickets.issue("CA1", "a", "h:1")
    assert first is not None
    assert tickets.issue("CA1", "b", None) is None  # a replayed webhook: no second ticket
    record = tickets.redeem(first, "CA1")
    assert record is not None and (record.persona, record.caller) == ("a", "h:1")
    assert tickets.redeem(first, "CA1") is None  # once
    other = tickets.issue("CA2", "a", None)
    assert tickets.redeem(other, "CA3") is None  # for another call
    late = tickets.issue("CA4", "a", None)
    now[0] = 61.0
    assert tickets.redeem(late, "CA4") is None  # expired
    assert tickets.redeem("made-up", "CA5") is None and tickets.redeem(None, None) is None
    for n in range(3):
        assert tickets.issue(f"CB{n}", "a", None) is not None
    assert tickets.issue("CB9", "a", None) is None  # a flood is capped
    now[0] = 4000.0  # the pending ones expired and CA1 is forgotten after call_memory_s
    assert tickets.issue("CA1", "a", None) is not None


class RecordingStore:
    """A TurnStore that keeps what it is given."""

    def __init__(self) -> None:
        self.opened: list[Conversation] = []

    def open_conversation(self, conversation: Conversation) -> None:
        self.opened.append(conversation)

    def record(self, turn: Turn) -> None:
        pass

    def close_conversation(self, conversation_id: uuid.UUID, ended_at: datetime) -> None:
        pass

    def recent_turns(self, conversation_id: uuid.UUID, limit: int) -> list[Turn]:
        return []


def _two_personas(store: RecordingStore) -> Runtime:
    stacks = {}
    for name in ("test-en", "front-desk"):
        stacks[name] = PersonaStack(
            persona=fakes.persona("en", name=name),
            transcriber=fakes.FakeTranscriber(),
            chat=fakes.FakeChat(),
            synthesizer=fakes.ToneSynthesizer(per_char_s=0.01),
        )
    return Runtime(
        vad=fakes.EnergyVad(),
        stacks=stacks,
        turn_config=TurnConfig(),
        default_persona="test-en",
        store=store,  # type: ignore[arg-type]
    )


def test_a_media_stream_needs_the_ticket_of_a_call_just_answered(tmp_path: Path) -> None:
    store = RecordingStore()
    settings = Settings(
        data_dir=tmp_path,
        twilio_auth_token="twilio-secret",
        api_token=TOKEN,
        phone_personas={"+15550001111": "front-desk"},
        caller_hash_salt="pepper",
    )
    app = create_app(settings, backend=backend_of(_two_personas(store)))
    checker = SignatureChecker("twilio-secret")
    with LiveServer(app) as live:
        url = f"{live.http}/telephone/incoming"

        def answer(call_sid: str) -> httpx.Response:
            form = {"CallSid": call_sid, "From": "+15559998888", "To": "+15550001111"}
            return httpx.post(
                url, data=form, headers={"X-Twilio-Signature": checker.sign(url, form)}
            )

        def ticket_of(reply: httpx.Response) -> str:
            found = re.search(r'<Parameter name="ticket" value="([^"]+)" />', reply.text)
            assert found is not None, reply.text
            return found[1]

        first = answer("CA1")
        assert first.status_code == 200
        ticket = ticket_of(first)
        assert answer("CA1").status_code == 409  # the same webhook replayed: no second stream
        other_ticket = ticket_of(answer("CA2"))
        ws_url = f"{live.ws}/telephone/handler"
        signed = {"X-Twilio-Signature": checker.sign(ws_url, {})}

        async def refused(**kwargs: Any) -> None:
            async with TwilioClient(ws_url, headers=signed, **kwargs) as caller:
                await asyncio.wait_for(caller.heard.closed.wait(), 10)
                assert caller.heard.media_frames == 0  # not even the greeting
                assert caller.ws is not None and caller.ws.close_code == 1008

        async def scenario() -> None:
            with pytest.raises(InvalidStatus):
                async with TwilioClient(ws_url, headers={"X-Twilio-Signature": "forged"}):
                    pass
            await refused(call_sid="CA1")  # a signed handshake alone no longer opens a call
            await refused(call_sid="CA1", parameters={"ticket": "made-up"})
            await refused(call_sid="CA3", parameters={"ticket": other_ticket})  # another call's
            # the real one: persona and caller from the ticket, not from the parameters
            forged = {"ticket": ticket, "persona": "test-en", "caller": "h:someone-else"}
            async with TwilioClient(
                ws_url, headers=signed, parameters=forged, call_sid="CA1"
            ) as caller:
                assert await caller.wait_for(lambda: caller.heard.media_frames > 5, 10)
                await caller.stop()
            await refused(call_sid="CA1", parameters={"ticket": ticket})  # used once already

        asyncio.run(asyncio.wait_for(scenario(), 60))
    (opened,) = store.opened
    assert opened.persona == "front-desk" and opened.channel == "phone"
    assert opened.caller_ref == caller_hash("+15559998888", b"pepper")


# --- who may continue which conversation --------------------------------------------------------


def test_resume_policy() -> None:
    web = StoredConversation("test-en", "web")
    assert resume_refusal(web, persona="test-en", channel="web") is None
    assert resume_refusal(web, persona="front-desk", channel="web") is not None
    assert resume_refusal(web, persona="test-en", channel="api") is not None
    assert resume_refusal(web, persona="test-en", channel="phone") is not None
    assert resume_refusal(StoredConversation("test-en", "phone"), persona="test-en", channel="web")
    assert resume_refusal(StoredConversation(None, None), persona="test-en", channel="web")
    assert resume_refusal(None, persona="test-en", channel="web") is not None


@pytest.mark.parametrize("page", ["served", "stand-alone"])
def test_the_page_continues_only_its_own_conversations_and_never_rewrites_them(
    page: str, tmp_path: Path, pg_dsn: str
) -> None:
    """``serve``'s page at /ui and ``voicebot ui``'s page alone (``create_page_app``) apply
    one rule: their calls are the page stream's own handlers."""
    import psycopg

    from voicebot.store import PostgresTurnStore

    store = PostgresTurnStore(pg_dsn, tmp_path / "spool.jsonl", 100).start()
    runtime = _two_personas(RecordingStore())
    runtime = Runtime(
        vad=runtime.vad,
        stacks=runtime.stacks,
        turn_config=runtime.turn_config,
        default_persona=runtime.default_persona,
        store=store,
    )
    earlier = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    phone, web, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    store.open_conversation(Conversation(phone, "test-en", "phone", earlier, caller_ref="h:1"))
    store.open_conversation(Conversation(web, "test-en", "web", earlier))
    store.open_conversation(Conversation(other, "front-desk", "web", earlier))
    for cid in (phone, web, other):
        store.record(Turn(cid, 1, "a private question", "an answer"))
    assert store.flush(10)

    def stored(cid: uuid.UUID) -> tuple[Any, ...]:
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute(
                "SELECT persona, channel, started_at, caller_ref FROM conversations WHERE id = %s",
                (cid,),
            ).fetchone()
        assert row is not None
        return tuple(row)

    before = {cid: stored(cid) for cid in (phone, web, other)}
    settings, backend = Settings(data_dir=tmp_path), backend_of(runtime, pg_dsn)
    if page == "served":
        app = FastAPI()
        service = mount(app, "", settings=settings, ui=True, backend=backend)
    else:
        app = create_page_app(settings, backend=backend)
        (service,) = services_of(app)
    with TestClient(app) as client:
        if page == "stand-alone":
            assert client.get("/").status_code == 200  # the page, at the root
            assert client.get("/api/personas").status_code == 404  # and nothing else
        attempts = [(phone, False), (other, False), ("not-an-id", False), (web, True)]
        for cid, allowed in attempts:
            handler = service.ui_stream.event_handler.copy()  # what a page call runs
            handler.resume(cid)  # what the page's "continue conversation" box does
            assert (handler.conversation_id == cid) is allowed, cid
            assert bool(handler.history) is allowed, cid
            handler.call.start()  # the call starts: its conversation record is written
            handler.shutdown()
        api = service.new_handler("api")
        api.resume(web)
        assert api.conversation_id != web  # the API never continues one
        assert store.flush(10)
    store.close()
    # what each conversation was started with is unchanged
    assert {cid: stored(cid) for cid in (phone, web, other)} == before
    assert before[phone] == ("test-en", "phone", earlier, "h:1")
