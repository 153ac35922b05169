"""The Ollama-protocol server, checked on the wire with httpx and the real ollama client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import ollama
import pytest

from voicebot.ollama_server import (
    PROFILES,
    ConversationScript,
    LlmProfile,
    OllamaProtocolServer,
    Rule,
    Script,
    ScriptedReply,
    ScriptedToolCall,
    echo_reply,
    tokenize,
)

FINAL_KEYS = {
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}


@pytest.fixture
def server():
    with OllamaProtocolServer("instant") as srv:
        yield srv


def chat_body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "llama3.2:3b", "messages": [{"role": "user", "content": text}], **extra}


def test_profiles():
    assert PROFILES["gpu-8b"] == LlmProfile("gpu-8b", 0.150, 60.0)
    assert PROFILES["cpu-3b"] == LlmProfile("cpu-3b", 0.600, 12.0)
    assert PROFILES["instant"].ttft_s == 0 and PROFILES["instant"].tokens_per_s == 0


@pytest.mark.parametrize(
    "text", ["hello there, how are you?", "こんにちは、元気です。", " a  b ", "Tokyo タワーへ"]
)
def test_tokenize_round_trips(text):
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert all(len(t.strip()) <= 2 for t in tokenize("こんにちは、元気です。"))


def test_default_script_echoes_in_the_users_language():
    english = echo_reply("book a table for two.")
    assert english.startswith("You said: book a table for two.")
    assert english.count(".") >= 3  # several sentences, to exercise chunking downstream
    japanese = echo_reply("東京に行きたい")
    assert "東京に行きたい" in japanese and japanese.count("。") >= 2


def test_script_cycles_fixed_replies():
    script = Script(["one.", "two."])
    assert [script.reply([]) for _ in range(3)] == ["one.", "two.", "one."]


def test_streamed_chat_is_ndjson_like_ollama(server):
    with httpx.stream("POST", server.base_url + "/api/chat", json=chat_body()) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        assert r.headers["transfer-encoding"] == "chunked"
        lines = [json.loads(line) for line in r.iter_lines()]
    *parts, final = lines
    assert all(p["done"] is False and p["model"] == "llama3.2:3b" for p in parts)
    assert all(p["message"]["role"] == "assistant" and "created_at" in p for p in parts)
    text = "".join(p["message"]["content"] for p in parts)
    assert text == echo_reply("hello there")
    assert final["done"] is True and final["done_reason"] == "stop"
    assert FINAL_KEYS <= final.keys()
    assert final["eval_count"] == len(parts)


def test_non_streamed_chat_is_one_object(server):
    r = httpx.post(server.base_url + "/api/chat", json=chat_body(stream=False))
    body = r.json()
    assert body["done"] is True and body["message"]["content"] == echo_reply("hello there")
    assert FINAL_KEYS <= body.keys()


def test_num_predict_truncates_with_done_reason_length(server):
    r = httpx.post(
        server.base_url + "/api/chat",
        json=chat_body(stream=False, options={"num_predict": 2}),
    )
    assert r.json()["done_reason"] == "length"
    assert r.json()["message"]["content"] == "You said:"


def test_empty_messages_loads_the_model(server):
    client = ollama.Client(server.base_url, timeout=5)
    reply = client.chat(model="llama3.2:3b", messages=[], keep_alive="1h")
    assert reply.done and reply.done_reason == "load"
    assert [m.model for m in client.ps().models] == ["llama3.2:3b"]


def test_unknown_model_is_404_like_ollama():
    with OllamaProtocolServer(models=["llama3.2:3b"]) as srv:
        r = httpx.post(srv.base_url + "/api/chat", json={**chat_body(), "model": "mistral"})
        assert r.status_code == 404
        assert r.json() == {"error": 'model "mistral" not found, try pulling it first'}
        # llama3.2 means llama3.2:latest, as in Ollama
        assert httpx.post(srv.base_url + "/api/show", json={"model": "llama3.2"}).status_code == 404


def test_metadata_routes_parse_with_the_real_client():
    with OllamaProtocolServer(models=["llama3.2:3b", "qwen2.5"]) as srv:
        client = ollama.Client(srv.base_url, timeout=5)
        assert [m.model for m in client.list().models] == ["llama3.2:3b", "qwen2.5:latest"]
        shown = client.show("qwen2.5")
        assert shown.details is not None and shown.details.format == "gguf"
        assert client.ps().models == []
        assert httpx.get(srv.base_url + "/api/version").json()["version"]
        assert httpx.get(srv.base_url + "/").text == "Ollama is running"


def test_pull_streams_progress_and_adds_the_model():
    with OllamaProtocolServer(models=[]) as srv:
        client = ollama.Client(srv.base_url, timeout=5)
        parts = list(client.pull("llama3.2:3b", stream=True))
        assert parts[0].status == "pulling manifest"
        assert parts[-1].status == "success"
        downloads = [p for p in parts if p.total]
        assert downloads and downloads[-1].completed == downloads[-1].total
        assert downloads[0].digest is not None and downloads[0].digest.startswith("sha256:")
        assert srv.models == {"llama3.2:3b"}


def test_records_requests(server):
    body = chat_body(options={"temperature": 0.1}, keep_alive="30m")
    httpx.post(server.base_url + "/api/chat", json=body)
    (rec,) = server.chat_requests()
    assert rec.model == "llama3.2:3b"
    assert rec.messages == body["messages"]
    assert rec.options == {"temperature": 0.1} and rec.keep_alive == "30m"
    assert rec.finished.wait(1) and not rec.client_disconnected
    assert rec.tokens_sent == rec.tokens_planned > 0


def test_client_disconnect_stops_generation():
    story = " ".join(f"word{i}" for i in range(100))  # ~1.7 s at 60 tokens/s
    with OllamaProtocolServer("gpu-8b", script=Script([story])) as srv:
        with httpx.stream("POST", srv.base_url + "/api/chat", json=chat_body()) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
        (rec,) = srv.chat_requests()
        assert rec.finished.wait(2)
        assert rec.client_disconnected
        assert rec.tokens_sent < 20 < rec.tokens_planned == 100


def test_down_refuses_connections_and_comes_back(server):
    url = server.base_url
    server.fault = "down"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/api/version")
    server.fault = "ok"
    assert server.base_url == url
    assert httpx.get(url + "/api/version").status_code == 200


def test_down_drops_idle_keep_alive_connections(server):
    with httpx.Client(base_url=server.base_url) as client:
        assert client.get("/api/version").status_code == 200
        server.stop()
        with pytest.raises(httpx.TransportError):
            client.get("/api/version")


def test_fault_modes_on_the_wire(server):
    server.fault = "http_500"
    r = httpx.post(server.base_url + "/api/chat", json=chat_body())
    assert r.status_code == 500 and "error" in r.json()

    server.fault = "error_midstream"
    with httpx.stream("POST", server.base_url + "/api/chat", json=chat_body()) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    assert len(lines) == server.fault_after_tokens + 1 and "error" in lines[-1]

    server.fault = "disconnect_midstream"
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", server.base_url + "/api/chat", json=chat_body()) as r,
    ):
        list(r.iter_lines())

    server.fault = "hang"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/api/chat", json=chat_body(), timeout=0.3)
    rec = server.chat_requests()[-1]
    assert rec.finished.wait(2) and rec.client_disconnected and rec.tokens_sent == 0

    with pytest.raises(ValueError):
        server.fault = "broken"


def test_slow_delays_the_first_token():
    with OllamaProtocolServer("instant", fault="slow", slow_min_s=0.3) as srv:
        started = time.monotonic()
        httpx.post(srv.base_url + "/api/chat", json=chat_body())
        assert time.monotonic() - started >= 0.3


def test_twenty_concurrent_streams():
    with OllamaProtocolServer("gpu-8b") as srv:

        def one(i: int) -> str:
            body = chat_body(f"client {i}")
            with httpx.stream("POST", srv.base_url + "/api/chat", json=body, timeout=10) as r:
                parts = [json.loads(line) for line in r.iter_lines()]
            return "".join(p["message"]["content"] for p in parts)

        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(one, range(20)))
        assert replies == [echo_reply(f"client {i}") for i in range(20)]
        # They ran side by side, not one after another (each takes ~0.4 s).
        assert time.monotonic() - started < 4


def test_fault_can_be_switched_from_other_threads(server):
    def flip():
        for _ in range(50):
            server.fault = "http_500"
            server.fault = "ok"

    threads = [threading.Thread(target=flip) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.fault == "ok"
    assert httpx.post(server.base_url + "/api/chat", json=chat_body()).status_code == 200


def test_runs_as_a_standalone_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "voicebot.ollama_server",
            "--profile",
            "instant",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = ollama.Client(f"http://127.0.0.1:{port}", timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = client.chat(
                    model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}]
                )
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert reply.message.content == echo_reply("hi")
    finally:
        proc.terminate()
        proc.wait(5)


# -- tool calls ---------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "check_availability",
            "description": "Check a table.",
            "parameters": {
                "type": "object",
                "properties": {"date": {"type": "string"}, "party_size": {"type": "integer"}},
                "required": ["date", "party_size"],
            },
        },
    }
]
CHECK = ScriptedToolCall("check_availability", {"date": "2026-12-05", "party_size": 2})


def tool_server(reply: ScriptedReply) -> OllamaProtocolServer:
    return OllamaProtocolServer("instant", script=ConversationScript([], default=reply))


def test_tool_calls_stream_like_ollama():
    with tool_server(ScriptedReply("Let me check.", (CHECK,))) as srv:
        body = chat_body("a table", tools=TOOLS)
        with httpx.stream("POST", srv.base_url + "/api/chat", json=body) as r:
            lines = [json.loads(line) for line in r.iter_lines()]
        recorded = srv.chat_requests()[0]
    *parts, calls, final = lines
    assert "".join(p["message"]["content"] for p in parts) == "Let me check."
    assert calls["done"] is False and calls["message"]["content"] == ""
    assert calls["message"]["tool_calls"] == [
        {
            "function": {
                "name": "check_availability",
                "arguments": {"date": "2026-12-05", "party_size": 2},
            }
        }
    ]
    assert isinstance(calls["message"]["tool_calls"][0]["function"]["arguments"], dict)
    assert final["done"] is True and "tool_calls" not in final["message"]
    assert recorded.tools == TOOLS and recorded.tool_calls == calls["message"]["tool_calls"]


def test_tool_calls_only_when_tools_are_offered():
    with tool_server(ScriptedReply("Let me check.", (CHECK,))) as srv:
        lines = [
            json.loads(line)
            for line in httpx.post(srv.base_url + "/api/chat", json=chat_body()).text.splitlines()
        ]
        assert all("tool_calls" not in line["message"] for line in lines)
        single = httpx.post(
            srv.base_url + "/api/chat", json=chat_body(stream=False, tools=TOOLS)
        ).json()
        assert single["message"]["tool_calls"][0]["function"]["name"] == "check_availability"


def test_the_real_client_parses_tool_calls_and_sends_tool_messages():
    script = ConversationScript(
        [
            Rule(ScriptedReply("", (CHECK,)), user="table"),
            Rule("Free at seven.", after_tool="check_availability", result_contains="available"),
            Rule("Full, sorry.", after_tool="check_availability"),
        ]
    )
    with OllamaProtocolServer("instant", script=script) as srv:
        client = ollama.Client(host=srv.base_url, timeout=5)
        parts = list(
            client.chat("m", [{"role": "user", "content": "A table?"}], tools=TOOLS, stream=True)
        )
        calls = [c for p in parts for c in p.message.tool_calls or []]
        assert calls[0].function.name == "check_availability"
        assert calls[0].function.arguments == {"date": "2026-12-05", "party_size": 2}
        history = [
            {"role": "user", "content": "A table?"},
            {"role": "assistant", "content": "", "tool_calls": [calls[0].model_dump()]},
        ]
        for result, answer in (("available: 19:00", "Free at seven."), ("full", "Full, sorry.")):
            tool = {"role": "tool", "content": result, "tool_name": "check_availability"}
            reply = client.chat("m", [*history, tool], tools=TOOLS, stream=False)
            assert reply.message.content == answer
        # Without tool_name (older servers), the tool is the last call's.
        reply = client.chat("m", [*history, {"role": "tool", "content": "full"}], stream=False)
        assert reply.message.content == "Full, sorry."
        recorded = srv.chat_requests()[1].messages
    assert recorded[-1] == {
        "role": "tool",
        "content": "available: 19:00",
        "tool_name": "check_availability",
    }
    assert recorded[-2]["tool_calls"][0]["function"]["name"] == "check_availability"


def test_conversation_script_rules():
    rules = [
        Rule("booked reply", after_tool="create", result_contains="booked"),
        Rule("hello reply", user="HELLO"),
        Rule("anything"),
    ]
    script = ConversationScript(rules)
    user = [{"role": "user", "content": "well, hello"}]
    assert script.reply(user) == "hello reply"
    tool = [*user, {"role": "tool", "content": "Booked: yes", "tool_name": "create"}]
    assert script.reply(tool) == "booked reply"
    assert script.reply([*user, {"role": "tool", "content": "no", "tool_name": "create"}]) == (
        "anything"
    )
    assert ConversationScript([]).reply(user) == echo_reply("well, hello")


def test_json_script_on_the_command_line(tmp_path):
    script = {
        "rules": [
            {
                "user": "table",
                "tool_calls": [{"name": "check_availability", "arguments": {"party_size": 2}}],
            },
            {"after_tool": "check_availability", "text": "We have one."},
        ],
        "default": "Sorry?",
    }
    parsed = ConversationScript.from_json(script)
    assert parsed.rules[0].reply == ScriptedReply(
        "", (ScriptedToolCall("check_availability", {"party_size": 2}),)
    )
    with pytest.raises(ValueError, match="not a conversation script"):
        ConversationScript.from_json({"rules": [{"tool_calls": [{"arguments": {}}]}]})
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "voicebot.ollama_server", "--profile", "instant"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--script", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = ollama.Client(f"http://127.0.0.1:{port}", timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = client.chat(
                    "m", [{"role": "user", "content": "a table"}], tools=TOOLS, stream=False
                )
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert reply.message.tool_calls[0].function.arguments == {"party_size": 2}
        assert client.chat("m", [{"role": "user", "content": "hm"}]).message.content == "Sorry?"
    finally:
        proc.terminate()
        proc.wait(5)
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    run = subprocess.run([*cmd, "--script", str(bad)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "bad.json" in run.stderr
