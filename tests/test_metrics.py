"""/metrics: Prometheus text that the official parser reads, counting real (simulated) calls."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import tone
from tests.support_served import LiveServer, backend_of, served_runtime
from tests.test_telephony import TwilioClient, to_8k
from voicebot.conversation import Timings, Turn
from voicebot.metrics import Metrics
from voicebot.server import create_app
from voicebot.settings import Settings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_turns_latencies_and_errors_by_stage() -> None:
    metrics = Metrics()
    ok = Turn(uuid.uuid4(), 1, "hi", timings=Timings(stt_ms=120.0, v2v_ms=800.0))
    failed = Turn(uuid.uuid4(), 2, "hi", error="llm: Ollama unreachable", timings=Timings())
    odd = Turn(uuid.uuid4(), 3, "hi", error="something else", timings=Timings())
    for turn in (ok, failed, odd):
        metrics.turn_finished(turn, "web")
    metrics.call_rejected("phone", "busy")
    got = samples(metrics.render().decode())
    assert got[("voicebot_turns_total", (("channel", "web"),))] == 3
    assert got[("voicebot_stage_latency_seconds_count", (("stage", "v2v"),))] == 1
    assert got[("voicebot_stage_latency_seconds_sum", (("stage", "stt"),))] == 0.12
    assert got[("voicebot_stage_errors_total", (("stage", "llm"),))] == 1
    assert got[("voicebot_stage_errors_total", (("stage", "other"),))] == 1
    assert got[("voicebot_calls_rejected_total", (("channel", "phone"), ("reason", "busy")))] == 1
    # a second instance has its own registry: nothing carries over
    fresh = samples(Metrics().render().decode())
    assert fresh[("voicebot_turns_total", (("channel", "web"),))] == 0


def test_metrics_count_a_simulated_phone_call(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, concurrency_limit=1)
    app = create_app(settings, backend=backend_of(served_runtime()))
    with LiveServer(app) as live:

        async def scenario() -> tuple[dict, dict]:  # type: ignore[type-arg]
            async with (
                TwilioClient(f"{live.ws}/telephone/handler") as caller,
                httpx.AsyncClient(base_url=live.http) as http,
            ):
                assert await caller.wait_for(lambda: caller.heard.marks, 10)
                await caller.speak(to_8k((16000, tone(0.8))))
                marks = len(caller.heard.marks)
                assert await caller.wait_for(lambda: len(caller.heard.marks) > marks, 10)
                async with TwilioClient(f"{live.ws}/telephone/handler") as busy:
                    await asyncio.wait_for(busy.heard.closed.wait(), 10)
                during = samples((await http.get("/metrics")).text)
                await caller.stop()
                await asyncio.wait_for(caller.heard.closed.wait(), 5)
                await asyncio.sleep(0.2)
                after = samples((await http.get("/metrics")).text)
                return during, after

        during, after = asyncio.run(scenario())
    phone = (("channel", "phone"),)
    assert during[("voicebot_calls_active", phone)] == 1
    assert after[("voicebot_calls_active", phone)] == 0
    assert after[("voicebot_calls_total", phone)] == 1
    assert after[("voicebot_turns_total", phone)] >= 1
    assert after[("voicebot_stage_latency_seconds_count", (("stage", "v2v"),))] >= 1
    assert after[("voicebot_calls_rejected_total", (("channel", "phone"), ("reason", "busy")))] == 1
