"""Prometheus metrics for one served app, in a registry of its own (two apps never collide).

Names (all prefixed ``voicebot_``): ``calls_active`` (gauge, by channel), ``calls_total``,
``calls_rejected_total`` (by channel and reason: busy, draining, invalid_offer, duplicate,
unauthorized, bad_signature), ``lines_free`` and ``lines_limit`` (gauges: lines a new call could
take now, 0 while draining; for autoscaling), ``draining`` (gauge, 1 while draining),
``turns_total``, ``stage_latency_seconds``
(histogram by stage: endpoint, stt, llm_ttft, tts_first, v2v, bargein_stop) and
``stage_errors_total`` (by stage, from the turn's error), ``llm_requests_wasted_total`` (by
channel: preemptive replies dropped because the user went on), ``turns_lost_total`` (turns the turn
log could neither store nor spool, read from the store at scrape time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from voicebot.conversation import Channel, Turn

CONTENT_TYPE = CONTENT_TYPE_LATEST
CHANNELS: tuple[Channel, ...] = ("web", "phone", "api", "simulate")
_STAGES = ("endpoint", "stt", "llm_ttft", "tts_first", "v2v", "bargein_stop")
_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _TurnsLost(Collector):
    """``voicebot_turns_lost_total``: a counter the store keeps, read at scrape time."""

    def __init__(self) -> None:
        self.count: Callable[[], float] = lambda: 0.0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "voicebot_turns_lost",
            "Turns the turn log could neither store nor spool (full disk, queues full).",
            value=self.count(),
        )


class Metrics:
    """The counters a server updates; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls_active = Gauge(
            "voicebot_calls_active", "Calls in progress.", ["channel"], registry=r
        )
        self.calls_total = Counter("voicebot_calls", "Calls accepted.", ["channel"], registry=r)
        self.calls_rejected = Counter(
            "voicebot_calls_rejected",
            "Calls refused (busy, auth, signature).",
            ["channel", "reason"],
            registry=r,
        )
        self.lines_free = Gauge(
            "voicebot_lines_free", "Lines a new call could take now (0 while draining).", registry=r
        )
        self.lines_limit = Gauge("voicebot_lines_limit", "Simultaneous calls allowed.", registry=r)
        self.draining = Gauge("voicebot_draining", "1 while the server drains.", registry=r)
        self.turns_total = Counter("voicebot_turns", "Finished turns.", ["channel"], registry=r)
        self.stage_latency = Histogram(
            "voicebot_stage_latency_seconds",
            "Per-turn latency of each stage.",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.stage_errors = Counter(
            "voicebot_stage_errors", "Turns where a stage failed.", ["stage"], registry=r
        )
        self.llm_requests_wasted = Counter(
            "voicebot_llm_requests_wasted",
            "LLM requests of preemptive replies dropped because the user went on.",
            ["channel"],
            registry=r,
        )
        self._turns_lost = _TurnsLost()
        r.register(self._turns_lost)
        for channel in CHANNELS:  # present (at 0) from the start, so dashboards see them
            self.calls_total.labels(channel)
            self.turns_total.labels(channel)
            self.llm_requests_wasted.labels(channel)

    def track_active(self, channel: Channel, count: Callable[[], float]) -> None:
        """Read the number of active calls on ``channel`` from ``count`` at scrape time."""
        self.calls_active.labels(channel).set_function(count)

    def track_turns_lost(self, count: Callable[[], float]) -> None:
        """Read ``voicebot_turns_lost_total`` from ``count`` at scrape time."""
        self._turns_lost.count = count

    def track_lines(
        self, free: Callable[[], float], limit: int, draining: Callable[[], bool]
    ) -> None:
        """Read the free lines and the draining flag at scrape time."""
        self.lines_free.set_function(free)
        self.lines_limit.set(limit)
        self.draining.set_function(lambda: float(draining()))

    def call_started(self, channel: Channel) -> None:
        self.calls_total.labels(channel).inc()

    def call_rejected(self, channel: Channel, reason: str) -> None:
        self.calls_rejected.labels(channel, reason).inc()

    def turn_finished(self, turn: Turn, channel: Channel) -> None:
        """The ``CallObserver`` hook: count the turn, its latencies and its failed stage."""
        self.turns_total.labels(channel).inc()
        t = turn.timings
        values = (
            t.endpoint_ms,
            t.stt_ms,
            t.llm_ttft_ms,
            t.tts_first_ms,
            t.v2v_ms,
            t.bargein_stop_ms,
        )
        for stage, value in zip(_STAGES, values, strict=True):
            if value is not None:
                self.stage_latency.labels(stage).observe(value / 1000)
        if turn.error:
            # StageError text starts with its stage ("llm: ..."); anything else is "other".
            stage = turn.error.split(":", 1)[0].strip()
            known = stage in {"stt", "llm", "tts", "store"}
            self.stage_errors.labels(stage if known else "other").inc()

    def llm_request_wasted(self, channel: Channel) -> None:
        """The ``CallObserver`` hook: a preemptive reply's LLM request was dropped."""
        self.llm_requests_wasted.labels(channel).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)
