"""The OpenAI-protocol chat stage: the real ``openai`` client against our OpenAI-protocol
server over loopback (streamed chunks, tool calls, faults mid-stream)."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from voicebot.conversation import Message
from voicebot.errors import ConfigError, StageError
from voicebot.llm import ChatModel
from voicebot.llm_openai import (
    OpenAIChat,
    ToolCallRequest,
    make_openai_client,
    openai_options,
    wire_messages,
)
from voicebot.ollama_server import LlmProfile, Script, echo_reply
from voicebot.openai_server import OpenAIProtocolServer, ScriptedToolCall, ToolScript

MODEL = "Qwen/Qwen2.5-7B-Instruct"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def user(text: str) -> list[Message]:
    return [Message("user", text)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server():
    with OpenAIProtocolServer("instant") as srv:
        yield srv


def client_for(server: OpenAIProtocolServer, timeout_s: float = 2.0, api_key: str | None = None):
    return make_openai_client(server.base_url, api_key=api_key, timeout_s=timeout_s)


@pytest.fixture
def chat(server):
    client = client_for(server)
    yield OpenAIChat(client, MODEL)
    client.close()


# -- plain replies ------------------------------------------------------------------------


def test_openai_chat_is_a_chat_model(chat):
    model: ChatModel = chat
    assert model.name == MODEL


def test_stream_yields_the_reply_in_pieces(chat):
    parts = list(chat.stream(user("Tell me about Paris")))
    assert len(parts) > 3
    assert "".join(parts) == echo_reply("Tell me about Paris")


def test_stream_japanese(chat):
    text = "".join(chat.stream(user("予約をお願いします")))
    assert text == echo_reply("予約をお願いします")


def test_tokens_arrive_incrementally():
    profile = LlmProfile("test", ttft_s=0.2, tokens_per_s=20.0)
    with OpenAIProtocolServer(profile) as srv:
        chat = OpenAIChat(client_for(srv), MODEL)
        started = time.monotonic()
        arrivals = [time.monotonic() - started for _ in chat.stream(user("one two three"))]
    assert 0.15 < arrivals[0] < 0.6
    # Streamed, not buffered: the last token comes well after the first.
    assert arrivals[-1] - arrivals[0] > 0.2


def test_request_carries_messages_and_sampling(server):
    sampling = {"temperature": 0.3, "top_p": 0.8, "num_predict": 64, "top_k": 20}
    chat = OpenAIChat(client_for(server, api_key="s3cret"), MODEL, options=openai_options(sampling))
    server.api_key = "s3cret"
    messages = [Message("system", "Be brief."), Message("user", "hi")]
    list(chat.stream(messages))
    (rec,) = server.chat_requests()
    assert rec.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert rec.stream is True
    body = rec.body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.8, 64)
    assert body["top_k"] == 20  # extra_body: vLLM and llama-server read it
    assert rec.headers["authorization"] == "Bearer s3cret"
    assert "tools" not in body


def test_max_tokens_cuts_the_reply_with_finish_reason_length(server):
    chat = OpenAIChat(client_for(server), MODEL, options={"max_tokens": 3})
    assert len(list(chat.stream(user("a b c d e f g")))) == 3


def test_closing_the_generator_cancels_server_side():
    with OpenAIProtocolServer(LlmProfile("slow", 0.0, 20.0), script=Script(["w " * 200])) as srv:
        chat = OpenAIChat(client_for(srv), MODEL)
        gen = chat.stream(user("go"))
        assert next(gen)
        next(gen)
        gen.close()
        (rec,) = srv.chat_requests()
        assert rec.finished.wait(2)
        assert rec.client_disconnected
        assert rec.chunks_sent < 20


# -- faults ------------------------------------------------------------------------------


def test_down_server_is_unreachable():
    port = free_port()
    client = make_openai_client(f"http://127.0.0.1:{port}/v1", api_key=None, timeout_s=2)
    with pytest.raises(StageError) as info:
        list(OpenAIChat(client, MODEL).stream(user("hi")))
    assert info.value.stage == "llm"
    assert f"unreachable at http://127.0.0.1:{port}/v1 (connection refused)" in str(info.value)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("http_500", "answered HTTP 500: EngineCore encountered an issue."),
        ("error_midstream", "failed mid-reply: CUDA out of memory"),
        ("disconnect_midstream", "dropped mid-reply"),
    ],
)
def test_fault_modes_raise_stage_error(server, chat, fault, message):
    server.fault = fault
    got: list[str] = []
    with pytest.raises(StageError) as info:
        got.extend(chat.stream(user("Tell me a long story please")))
    assert message in str(info.value)
    if fault != "http_500":
        assert len(got) == server.fault_after_chunks  # the text before the fault came through


def test_hang_times_out(server):
    server.fault = "hang"
    chat = OpenAIChat(client_for(server, timeout_s=0.5), MODEL)
    started = time.monotonic()
    with pytest.raises(StageError, match=r"sent nothing within 0.5 s"):
        list(chat.stream(user("hi")))
    assert time.monotonic() - started < 2


def test_slow_first_token_within_timeout_still_works():
    with OpenAIProtocolServer("instant", fault="slow", slow_min_s=0.4) as srv:
        assert "".join(OpenAIChat(client_for(srv), MODEL).stream(user("x")))


def test_server_going_down_between_calls(server, chat):
    assert list(chat.stream(user("first")))
    server.fault = "down"
    with pytest.raises(StageError, match=r"unreachable|dropped"):
        list(chat.stream(user("second")))
    server.fault = "ok"
    assert list(chat.stream(user("third")))


def test_unknown_model_names_the_model():
    with OpenAIProtocolServer("instant", models=["served-model"]) as srv:
        with pytest.raises(StageError, match=r"model nope is not served at .*/v1"):
            list(OpenAIChat(client_for(srv), "nope").stream(user("hi")))


def test_wrong_api_key_says_which_setting(server):
    server.api_key = "right"
    with pytest.raises(StageError, match=r"refused the API key.*VOICEBOT_OPENAI_API_KEY"):
        list(OpenAIChat(client_for(server, api_key="wrong"), MODEL).stream(user("hi")))


def test_no_api_key_setting_never_reads_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    list(OpenAIChat(client_for(server), MODEL).stream(user("hi")))
    (rec,) = server.chat_requests()
    assert rec.headers["authorization"] == "Bearer unused"


def test_stage_errors_are_logged_by_the_caller_not_here(server, chat, caplog):
    # One failure, one log line: the adapter raises; the call logs (and apologizes).
    server.fault = "http_500"
    with caplog.at_level(logging.INFO, logger="voicebot"), pytest.raises(StageError):
        list(chat.stream(user("hi")))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- tool calls ---------------------------------------------------------------------------


def test_streamed_tool_call_deltas_become_complete_calls():
    script = ToolScript(
        [
            ScriptedToolCall("get_weather", {"city": "Tōkyō", "unit": "celsius"}),
            ScriptedToolCall("get_time", {"zone": "Asia/Tokyo"}),
        ],
        "It is {get_weather} at {get_time}.",
    )
    with OpenAIProtocolServer("instant", script=script) as srv:
        chat = OpenAIChat(client_for(srv), MODEL)
        events = list(chat.stream_with_tools(user("weather?"), [WEATHER_TOOL]))
        (rec,) = srv.chat_requests()
    assert events == [
        ToolCallRequest("get_weather", {"city": "Tōkyō", "unit": "celsius"}),
        ToolCallRequest("get_time", {"zone": "Asia/Tokyo"}),
    ]
    assert rec.tools == [WEATHER_TOOL]
    # The arguments really came in several pieces.
    assert len(script.calls[0].arguments_text()) > 8


@dataclass(frozen=True)
class AssistantToolCalls:
    """The tool loop's assistant message (the same shape as ``voicebot.llm``'s)."""

    content: str
    calls: tuple[ToolCallRequest, ...]
    role: str = "assistant"


@dataclass(frozen=True)
class ToolResult:
    """A tool's answer (the same shape as ``voicebot.llm``'s)."""

    tool_name: str
    content: str
    role: str = "tool"


def test_a_whole_tool_round_trip():
    script = ToolScript(
        [ScriptedToolCall("get_weather", {"city": "Paris"})], "In Paris it is {get_weather}."
    )
    with OpenAIProtocolServer("instant", script=script) as srv:
        chat = OpenAIChat(client_for(srv), MODEL)
        messages: list = [Message("system", "Be brief."), Message("user", "Weather in Paris?")]
        calls = list(chat.stream_with_tools(messages, [WEATHER_TOOL]))
        assert calls == [ToolCallRequest("get_weather", {"city": "Paris"})]
        messages += [AssistantToolCalls("", tuple(calls)), ToolResult("get_weather", "sunny")]
        text = "".join(str(e) for e in chat.stream_with_tools(messages, [WEATHER_TOOL]))
        second = srv.chat_requests()[1]
    assert text == "In Paris it is sunny."
    assistant, tool = second.messages[2], second.messages[3]
    assert assistant["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    call_id = assistant["tool_calls"][0]["id"]
    assert tool == {"role": "tool", "tool_call_id": call_id, "content": "sunny"}
    assert len(assistant["tool_calls"][0]["id"]) == 9  # what Mistral-family servers accept


def test_tool_results_pair_with_calls_by_order_and_name():
    calls = (ToolCallRequest("a", {}), ToolCallRequest("b", {}), ToolCallRequest("a", {"n": 2}))
    wire = wire_messages(
        [
            Message("user", "x"),
            AssistantToolCalls("", calls),
            ToolResult("b", "B"),
            ToolResult("a", "A1"),
            ToolResult("a", "A2"),
        ]
    )
    ids = [c["id"] for c in wire[1]["tool_calls"]]
    assert [m["tool_call_id"] for m in wire[2:]] == [ids[1], ids[0], ids[2]]


def test_a_tool_result_without_its_call_is_a_clear_error(chat):
    with pytest.raises(StageError, match="result of tool 'a' follows no call"):
        list(chat.stream_with_tools([Message("user", "x"), ToolResult("a", "?")], []))


def test_broken_tool_arguments_are_a_stage_error():
    script = ToolScript([ScriptedToolCall("get_weather", raw_arguments='{"city": "Par')], "")
    with OpenAIProtocolServer("instant", script=script) as srv:
        chat = OpenAIChat(client_for(srv), MODEL)
        with pytest.raises(StageError, match="get_weather' with arguments that are not JSON"):
            list(chat.stream_with_tools(user("weather?"), [WEATHER_TOOL]))


def test_a_fault_in_the_middle_of_tool_call_deltas():
    script = ToolScript([ScriptedToolCall("get_weather", {"city": "Rio de Janeiro"})], "")
    with OpenAIProtocolServer("instant", script=script, fault="error_midstream") as srv:
        chat = OpenAIChat(client_for(srv), MODEL)
        with pytest.raises(StageError, match="failed mid-reply"):
            list(chat.stream_with_tools(user("weather?"), [WEATHER_TOOL]))


def test_plain_stream_ignores_unasked_tool_calls():
    script = ToolScript([ScriptedToolCall("get_weather", {"city": "Paris"})], "")
    with OpenAIProtocolServer("instant", script=script) as srv:
        assert list(OpenAIChat(client_for(srv), MODEL).stream(user("weather?"))) == []


# -- start-up -----------------------------------------------------------------------------


def test_warm_up_runs_one_token(server, chat):
    chat.warm_up()
    (rec,) = server.chat_requests()
    assert rec.body["max_tokens"] == 1 and rec.stream is False


def test_warm_up_errors_are_stage_errors():
    client = make_openai_client(f"http://127.0.0.1:{free_port()}/v1", api_key=None, timeout_s=1)
    with pytest.raises(StageError, match="unreachable"):
        OpenAIChat(client, MODEL).warm_up()


def test_check_passes_for_a_served_model():
    with OpenAIProtocolServer("instant", models=[MODEL]) as srv:
        OpenAIChat(client_for(srv), MODEL).check()


def test_check_names_the_served_models():
    with OpenAIProtocolServer("instant", models=["a-model", "b-model"]) as srv:
        with pytest.raises(ConfigError, match=r"serves a-model, b-model\): set the persona"):
            OpenAIChat(client_for(srv), "other").check()


def test_check_dead_server_says_how_to_fix_it():
    client = make_openai_client(f"http://127.0.0.1:{free_port()}/v1", api_key=None, timeout_s=1)
    with pytest.raises(ConfigError, match="VOICEBOT_OPENAI_BASE_URL"):
        OpenAIChat(client, MODEL).check()


def test_check_wrong_base_path():
    with OpenAIProtocolServer("instant") as srv:
        client = make_openai_client(srv.base_url[: -len("/v1")], api_key=None, timeout_s=1)
        with pytest.raises(ConfigError, match="HTTP 404 to GET /models"):
            OpenAIChat(client, MODEL).check()


# -- chosen per persona or by setting --------------------------------------------------------


def test_backend_chosen_per_persona_or_by_setting(tmp_path: Path):
    from voicebot.app import ChatFactory
    from voicebot.llm import OllamaChat
    from voicebot.personas import load_personas
    from voicebot.settings import Settings

    source = Path(__file__).resolve().parent.parent / "personas" / "assistant-en.toml"
    text = source.read_text(encoding="utf-8")
    (tmp_path / "assistant-en.toml").write_text(text, encoding="utf-8")
    (tmp_path / "vllm-en.toml").write_text(
        text.replace('name = "assistant-en"', 'name = "vllm-en"').replace(
            'llm_model = "llama3.2:3b"', 'llm_model = "m"\nllm_backend = "openai"'
        ),
        encoding="utf-8",
    )
    personas = load_personas(tmp_path)
    assert personas["vllm-en"].llm_backend == "openai"

    settings = Settings(data_dir=tmp_path, openai_base_url="http://127.0.0.1:8001/v1")
    chats = ChatFactory(settings)
    chat = chats.chat_for(personas["vllm-en"])
    assert isinstance(chat, OpenAIChat)
    assert str(chat.client.base_url) == "http://127.0.0.1:8001/v1/"
    assert chat.options["max_tokens"] == personas["vllm-en"].sampling.num_predict
    assert isinstance(chats.chat_for(personas["assistant-en"]), OllamaChat)

    everything_openai = ChatFactory(Settings(data_dir=tmp_path, llm_backend="openai"))
    assert isinstance(everything_openai.chat_for(personas["assistant-en"]), OpenAIChat)


def test_backend_setting_rejects_unknown_values(tmp_path: Path):
    from pydantic import ValidationError

    from voicebot.settings import Settings

    with pytest.raises(ValidationError, match="llm_backend"):
        Settings(data_dir=tmp_path, llm_backend="vllm")


# -- a whole call on the openai backend ----------------------------------------------------------

PARIS = "Paris is the capital of France."


def test_a_call_on_the_openai_backend_answers_and_survives_a_fault(
    tmp_path: Path, tiny_en_model_dir: Path, joe_voice_path: Path
) -> None:
    from tests.support_voice import KeywordScript, Timeline, joe, say
    from voicebot.app import build_runtime
    from voicebot.settings import Settings
    from voicebot.simulate import simulate_call, turn_record

    script = KeywordScript([("france", PARIS)])
    with OpenAIProtocolServer("gpu-8b", script=script, models=["llama3.2:3b"]) as srv:
        settings = Settings(
            data_dir=tmp_path,
            persona="assistant-en",
            stt_model=str(tiny_en_model_dir),
            tts_voice=str(joe_voice_path),
            llm_backend="openai",
            openai_base_url=srv.base_url,
            ollama_host="http://127.0.0.1:9",  # not used: nothing may reach for Ollama
        )
        runtime = build_runtime(settings, personas=["assistant-en"], warm_up=False)
        voice = joe(joe_voice_path)
        question = say(voice, "What is the capital of France?")
        call = Timeline(voice.sample_rate).silence(0.3).clip(question).silence(4.0).audio
        # One call answered; the next meets an error halfway through the reply.
        started = time.monotonic()
        (first,) = simulate_call(runtime, call).turns
        srv.fault = "error_midstream"
        (second,) = simulate_call(runtime, call).turns
        print(f"two simulated calls in {time.monotonic() - started:.1f} s")
        last = srv.chat_requests()[-1].messages
    assert first.assistant_text == PARIS, turn_record(first)
    assert first.error is None
    assert first.llm_model == "llama3.2:3b"
    apology = runtime.stack("assistant-en").persona.apology
    assert second.error and "failed mid-reply" in second.error
    assert second.assistant_text.endswith(apology)
    # The persona's system prompt went over the OpenAI protocol, then the user's words.
    assert [m["role"] for m in last] == ["system", "user"]
    assert "capital of france" in last[1]["content"].lower()
