"""The chat stage: the real ollama client against our Ollama-protocol server over loopback."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from voicebot.conversation import Message
from voicebot.errors import ConfigError, StageError
from voicebot.llm import (
    AssistantToolCalls,
    ChatModel,
    OllamaChat,
    ToolCallRequest,
    ToolChatModel,
    ToolResult,
    build_messages,
    make_client,
    pull_model,
)
from voicebot.ollama_server import (
    ConversationScript,
    OllamaProtocolServer,
    Rule,
    Script,
    ScriptedReply,
    ScriptedToolCall,
    echo_reply,
)

MODEL = "llama3.2:3b"


def user(text: str) -> list[Message]:
    return [Message("user", text)]


@pytest.fixture
def server():
    with OllamaProtocolServer("instant") as srv:
        yield srv


@pytest.fixture
def chat(server):
    with make_client(server.base_url, timeout_s=2.0) as client:
        yield OllamaChat(client, MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- build_messages ---------------------------------------------------------------------


def history(n_turns: int) -> list[Message]:
    out = []
    for i in range(n_turns):
        out += [Message("user", f"q{i}"), Message("assistant", f"a{i}")]
    return out


def test_build_messages_puts_system_first_and_user_last():
    messages = build_messages("Be brief.", history(2), "now?", max_history_messages=10)
    assert messages[0] == Message("system", "Be brief.")
    assert messages[-1] == Message("user", "now?")
    assert messages[1:-1] == history(2)


def test_build_messages_bounds_the_window_without_an_orphan_reply():
    messages = build_messages("S", history(5), "now?", max_history_messages=3)
    # The last 3 would start with assistant "a3"; that orphan is dropped.
    assert [m.content for m in messages] == ["S", "q4", "a4", "now?"]
    even = build_messages("S", history(5), "now?", max_history_messages=4)
    assert [m.content for m in even] == ["S", "q3", "a3", "q4", "a4", "now?"]
    assert build_messages("S", history(5), "x", max_history_messages=0) == [
        Message("system", "S"),
        Message("user", "x"),
    ]
    with pytest.raises(ValueError):
        build_messages("S", [], "x", max_history_messages=-1)


def test_build_messages_drops_stray_system_messages():
    hist = [Message("system", "old"), *history(1)]
    assert build_messages("S", hist, "x", 10)[:2] == [Message("system", "S"), hist[1]]


# -- streaming ----------------------------------------------------------------------------


def test_ollama_chat_is_a_chat_model(chat):
    model: ChatModel = chat
    assert model.name == MODEL


def test_stream_yields_the_reply(chat):
    assert "".join(chat.stream(user("book a table"))) == echo_reply("book a table")


def test_stream_japanese(chat):
    deltas = list(chat.stream(user("東京に行きたい")))
    assert "".join(deltas) == echo_reply("東京に行きたい")
    assert max(len(d) for d in deltas) <= 2


def test_tokens_arrive_incrementally():
    with OllamaProtocolServer("gpu-8b") as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=5), MODEL)
        started = time.monotonic()
        arrivals, sent_at_first = [], None
        for _ in chat.stream(user("hello there")):
            arrivals.append(time.monotonic() - started)
            if sent_at_first is None:
                sent_at_first = srv.chat_requests()[0].tokens_sent
        planned = srv.chat_requests()[0].tokens_planned
    ttft, total = arrivals[0], arrivals[-1]
    assert len(arrivals) == planned > 5
    # The first token reached us while the server was still generating the rest.
    assert sent_at_first is not None and sent_at_first < planned
    assert ttft < total  # ttft ~0.15 s, total ~0.4 s; not asserted tightly


def test_request_carries_system_prompt_history_options_and_keep_alive(server):
    client = make_client(server.base_url, timeout_s=2)
    chat = OllamaChat(client, MODEL, options={"temperature": 0.3, "num_ctx": 2048}, keep_alive="1h")
    messages = build_messages("You are a receptionist.", history(10), "hi", 4)
    list(chat.stream(messages))
    (rec,) = server.chat_requests()
    assert rec.messages[0] == {"role": "system", "content": "You are a receptionist."}
    assert rec.messages[-1] == {"role": "user", "content": "hi"}
    assert len(rec.messages) == 1 + 4 + 1
    assert rec.options == {"temperature": 0.3, "num_ctx": 2048}
    assert rec.keep_alive == "1h"
    assert rec.model == MODEL and rec.stream is True


def test_scripted_replies():
    with OllamaProtocolServer(script=Script(["First. Second."])) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=2), MODEL)
        assert "".join(chat.stream(user("x"))) == "First. Second."


def test_closing_the_generator_cancels_server_side():
    story = " ".join(f"word{i}" for i in range(100))  # ~1.7 s at 60 tokens/s
    with OllamaProtocolServer("gpu-8b", script=Script([story, "Fine."])) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=5), MODEL)
        gen = chat.stream(user("tell me a long story"))
        got = [next(gen), next(gen)]
        gen.close()
        assert got == ["word0", " word1"]
        (rec,) = srv.chat_requests()
        assert rec.finished.wait(2), "the server kept generating after the client left"
        assert rec.client_disconnected
        assert rec.tokens_sent < 20 < rec.tokens_planned == 100
        # The stage still works after a cancelled turn.
        assert "".join(chat.stream(user("again"))) == "Fine."


def test_twenty_concurrent_streams():
    with OllamaProtocolServer("gpu-8b") as srv:
        client = make_client(srv.base_url, timeout_s=10)
        chat = OllamaChat(client, MODEL)
        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda i: "".join(chat.stream(user(f"n{i}"))), range(20)))
    assert replies == [echo_reply(f"n{i}") for i in range(20)]
    assert len(srv.chat_requests()) == 20


# -- failures ---------------------------------------------------------------------------


def test_down_server_is_unreachable():
    url = f"http://127.0.0.1:{free_port()}"
    chat = OllamaChat(make_client(url, timeout_s=2), MODEL)
    with pytest.raises(StageError, match=r"Ollama unreachable at http://127\.0\.0\.1") as info:
        list(chat.stream(user("hi")))
    assert info.value.stage == "llm"
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_stopped_server_mid_call(server, chat):
    assert list(chat.stream(user("hi")))
    server.fault = "down"
    with pytest.raises(StageError, match="unreachable"):
        list(chat.stream(user("hi")))
    server.fault = "ok"
    assert list(chat.stream(user("hi")))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("http_500", "answered HTTP 500: llama runner process has terminated"),
        ("error_midstream", "failed mid-reply: an error was encountered"),
        ("disconnect_midstream", "dropped mid-reply"),
    ],
)
def test_fault_modes_raise_stage_error(server, chat, fault, message):
    server.fault = fault
    deltas: list[str] = []
    with pytest.raises(StageError, match=message) as info:
        deltas.extend(chat.stream(user("hello there")))
    assert info.value.stage == "llm"
    assert info.value.__cause__ is not None
    if fault != "http_500":
        assert len(deltas) == server.fault_after_tokens  # tokens before the failure got out


def test_hang_times_out():
    with OllamaProtocolServer("instant", fault="hang") as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=0.3), MODEL)
        started = time.monotonic()
        with pytest.raises(StageError, match=r"sent nothing within 0.3 s"):
            list(chat.stream(user("hi")))
        assert time.monotonic() - started < 2
        assert srv.chat_requests()[0].finished.wait(2)


def test_slow_first_token_within_timeout_still_works():
    with OllamaProtocolServer("instant", fault="slow", slow_min_s=0.2) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=2), MODEL)
        assert "".join(chat.stream(user("hi"))) == echo_reply("hi")


def test_unknown_model_says_how_to_pull_it():
    with OllamaProtocolServer(models=[MODEL]) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=2), "mistral:7b")
        with pytest.raises(StageError, match=r"run `ollama pull mistral:7b`"):
            list(chat.stream(user("hi")))


def test_reply_cut_without_done_is_an_error():
    def handler(request: httpx.Request) -> httpx.Response:
        line = {"model": MODEL, "message": {"role": "assistant", "content": "Hi"}, "done": False}
        return httpx.Response(200, content=json.dumps(line).encode() + b"\n")

    chat = OllamaChat(
        make_client("http://ollama.test", timeout_s=1, transport=httpx.MockTransport(handler)),
        MODEL,
    )
    with pytest.raises(StageError, match="ended before it was done"):
        list(chat.stream(user("hi")))


def test_mock_transport_and_timeouts():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        lines = [
            {"model": MODEL, "message": {"role": "assistant", "content": "Hel"}, "done": False},
            {"model": MODEL, "message": {"role": "assistant", "content": "lo."}, "done": False},
            {"model": MODEL, "message": {"role": "assistant", "content": ""}, "done": True},
        ]
        return httpx.Response(200, content=b"".join(json.dumps(x).encode() + b"\n" for x in lines))

    client = make_client(
        "http://ollama.test:11434",
        timeout_s=7,
        connect_timeout_s=1.5,
        transport=httpx.MockTransport(handler),
    )
    assert client._client.timeout == httpx.Timeout(7, connect=1.5)
    assert list(OllamaChat(client, MODEL).stream(user("hi"))) == ["Hel", "lo."]
    assert json.loads(seen[0].content)["keep_alive"] == "30m"


# -- tools --------------------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": "check_availability",
        "description": "Check a table.",
        "parameters": {
            "type": "object",
            "properties": {"party_size": {"type": "integer", "description": "people"}},
            "required": ["party_size"],
        },
    },
}


def test_stream_with_tools_surfaces_tool_calls_in_order():
    reply = ScriptedReply("Checking.", (ScriptedToolCall("check_availability", {"party_size": 2}),))
    script = ConversationScript([Rule("Free.", after_tool="check_availability")], default=reply)
    with OllamaProtocolServer(script=script) as srv:
        chat: ToolChatModel = OllamaChat(make_client(srv.base_url, timeout_s=2), MODEL)
        events = list(chat.stream_with_tools(user("a table?"), [TOOL]))
        assert "".join(e for e in events if isinstance(e, str)) == "Checking."
        assert events[-1] == ToolCallRequest("check_availability", {"party_size": 2})
        call = events[-1]
        follow = [
            *user("a table?"),
            AssistantToolCalls("Checking.", (call,)),
            ToolResult("check_availability", "available"),
        ]
        assert "".join(e for e in chat.stream_with_tools(follow, [TOOL])) == "Free."
        first, second = srv.chat_requests()
    assert first.tools == [TOOL]
    assert second.messages[1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"function": {"name": "check_availability", "arguments": {"party_size": 2}}}
            ],
        },
        {"role": "tool", "content": "available", "tool_name": "check_availability"},
    ]


def test_plain_stream_sends_no_tools_and_ignores_tool_calls():
    reply = ScriptedReply("Hi.", (ScriptedToolCall("check_availability", {}),))
    with OllamaProtocolServer(script=ConversationScript([], default=reply)) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=2), MODEL)
        assert list(chat.stream(user("x"))) == ["Hi."]
        assert srv.chat_requests()[0].tools == []
        assert not srv.chat_requests()[0].body.get("tools")


def test_tool_call_with_non_object_arguments_is_a_stage_error():
    bad = ScriptedReply("", (ScriptedToolCall("check_availability", "party_size=2"),))
    with OllamaProtocolServer(script=ConversationScript([], default=bad)) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=2), MODEL)
        with pytest.raises(StageError, match="unexpected reply from Ollama"):
            list(chat.stream_with_tools(user("x"), [TOOL]))


# -- warm-up, check, pull ---------------------------------------------------------------


def test_warm_up_loads_and_keeps_the_model(server, chat):
    chat.warm_up()
    (rec,) = server.chat_requests()
    assert rec.messages == [] and rec.keep_alive == "30m"
    assert [m.model for m in chat.client.ps().models] == [MODEL]


def test_warm_up_errors_are_stage_errors():
    chat = OllamaChat(make_client(f"http://127.0.0.1:{free_port()}", timeout_s=1), MODEL)
    with pytest.raises(StageError, match="unreachable"):
        chat.warm_up()


def test_check_passes_for_a_pulled_model():
    with OllamaProtocolServer(models=[MODEL]) as srv:
        OllamaChat(make_client(srv.base_url, timeout_s=2), MODEL).check()


def test_check_missing_model():
    with OllamaProtocolServer(models=[MODEL]) as srv:
        chat = OllamaChat(make_client(srv.base_url, timeout_s=2), "qwen2.5:7b")
        with pytest.raises(ConfigError, match=r"model qwen2.5:7b is not pulled: run `ollama pull"):
            chat.check()


def test_check_dead_server():
    url = f"http://127.0.0.1:{free_port()}"
    chat = OllamaChat(make_client(url, timeout_s=1), MODEL)
    with pytest.raises(ConfigError, match=f"Ollama is not reachable at {url}: start it with"):
        chat.check()


def test_pull_model_reports_progress():
    with OllamaProtocolServer(models=[]) as srv:
        client = make_client(srv.base_url, timeout_s=2)
        seen: list[tuple[str, int | None, int | None]] = []
        pull_model(client, MODEL, lambda *args: seen.append(args))
        assert seen[0] == ("pulling manifest", None, None)
        assert seen[-1][0] == "success"
        sizes = [(done, total) for _, done, total in seen if total]
        assert sizes[-1][0] == sizes[-1][1] and len(sizes) > 2
        OllamaChat(client, MODEL).check()  # now pulled


def test_pull_model_dead_server():
    client = make_client(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    with pytest.raises(ConfigError, match="not reachable"):
        pull_model(client, MODEL, lambda *args: None)
