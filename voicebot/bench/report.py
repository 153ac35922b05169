"""Summaries of the measurements: per-pipeline percentiles, ratios, the table, JSON and plot."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from voicebot.bench.metrics import Percentiles, percentiles
from voicebot.bench.runner import METRICS, PIPELINES, PREEMPTIVE_SETTINGS, Measurement

SPEC_METRICS = (
    "endpoint_ms",
    "stt_ms",
    "llm_ttft_ms",
    "tts_first_ms",
    "v2v_ms",
    "first_sound_ms",
    "bargein_stop_ms",
)
_LABELS = {
    "endpoint_ms": "endpointing",
    "stt_ms": "STT",
    "llm_ttft_ms": "LLM first token",
    "llm_first_chunk_ms": "LLM first chunk",
    "tts_first_ms": "TTS first audio",
    "v2v_ms": "voice-to-voice",
    "first_sound_ms": "first sound",
    "bargein_stop_ms": "barge-in stop",
    "reply_stall_ms": "reply stalled",
}


@dataclass
class PipelineSummary:
    """One pipeline on one language: percentiles per metric and the error rate."""

    pipeline: str
    language: str
    metrics: dict[str, Percentiles]
    error_rate: float | None
    """WER (English) or CER (Japanese), errors summed over utterances."""
    error_rate_kind: str
    calls: int


@dataclass
class Ratio:
    """ours / baseline of a metric's p50, overall and per repeat."""

    language: str
    metric: str
    p50_ratio: float | None
    per_repeat_min: float | None
    per_repeat_max: float | None


@dataclass
class SessionLevel:
    """Voice-to-voice with N simultaneous calls."""

    pipeline: str
    sessions: int
    v2v: Percentiles
    feed_lag_max_ms: float
    calls: int


@dataclass
class PreemptionSummary:
    """Ours with one preemptive setting (``PREEMPTIVE_SETTINGS``), on one language."""

    language: str
    preemptive: str
    calls: int
    endpoint: Percentiles
    v2v: Percentiles
    wasted_llm_per_turn: float | None
    """LLM requests of dropped preemptive replies per answered turn."""
    turns: int = 0
    preemptive_played: int = 0
    """Turns answered by their preemptive reply."""
    head_start: Percentiles | None = None
    """Over the calls with such turns: how long the LLM had been asked at the close."""


@dataclass
class Target:
    """A figure the issue asks for, and whether this run reached it."""

    name: str
    goal: str
    value: float | None
    met: bool | None


@dataclass
class BenchReport:
    """Everything ``voicebot bench`` measured, with how and where."""

    machine: dict[str, Any]
    config: dict[str, Any]
    summaries: list[PipelineSummary]
    ratios: list[Ratio]
    sessions: list[SessionLevel]
    targets: list[Target]
    measurements: list[Measurement] = field(default_factory=list)
    session_measurements: list[Measurement] = field(default_factory=list)
    preemption: list[PreemptionSummary] = field(default_factory=list)

    def summary(self, pipeline: str, language: str) -> PipelineSummary | None:
        """The summary of one pipeline on one language."""
        return next(
            (s for s in self.summaries if s.pipeline == pipeline and s.language == language), None
        )

    def to_json(self) -> str:
        """The whole report as JSON."""
        return json.dumps(asdict(self), ensure_ascii=False, indent=2)


def machine_info() -> dict[str, Any]:
    """CPU model and count, OS and Python: where the numbers came from."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or baseline is None or baseline <= 0:
        return None
    return round(ours / baseline, 3)


def summarize(
    measurements: Sequence[Measurement],
    sessions: Sequence[Measurement] = (),
    *,
    machine: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> BenchReport:
    """Percentiles, error rates, ratios, session scaling and targets from the measurements."""
    everything = measurements
    measurements = [m for m in measurements if not m.variant]  # the main run
    languages = sorted({m.language for m in measurements})
    summaries: list[PipelineSummary] = []
    ratios: list[Ratio] = []
    for language in languages:
        for pipeline in PIPELINES:
            rows = [m for m in measurements if m.pipeline == pipeline and m.language == language]
            errors = sum(m.errors for m in rows)
            length = sum(m.reference_tokens for m in rows)
            summaries.append(
                PipelineSummary(
                    pipeline=pipeline,
                    language=language,
                    metrics={k: percentiles([m.value(k) for m in rows]) for k in METRICS},
                    error_rate=round(errors / length, 4) if length else None,
                    error_rate_kind="cer" if language == "ja" else "wer",
                    calls=len(rows),
                )
            )
        repeats = sorted({m.repeat for m in measurements if m.language == language})
        for metric in METRICS:
            p50 = {
                p: percentiles(
                    [
                        m.value(metric)
                        for m in measurements
                        if m.pipeline == p and m.language == language
                    ]
                ).p50
                for p in PIPELINES
            }
            per_repeat = [
                _ratio(
                    *(
                        percentiles(
                            [
                                m.value(metric)
                                for m in measurements
                                if m.pipeline == p and m.language == language and m.repeat == r
                            ]
                        ).p50
                        for p in PIPELINES
                    )
                )
                for r in repeats
            ]
            present = [r for r in per_repeat if r is not None]
            ratios.append(
                Ratio(
                    language,
                    metric,
                    _ratio(p50["ours"], p50["baseline"]),
                    min(present) if present else None,
                    max(present) if present else None,
                )
            )
    levels: list[SessionLevel] = []
    for pipeline in PIPELINES:
        for n in sorted({m.sessions for m in sessions if m.pipeline == pipeline}):
            rows = [m for m in sessions if m.pipeline == pipeline and m.sessions == n]
            levels.append(
                SessionLevel(
                    pipeline,
                    n,
                    percentiles([m.v2v_ms for m in rows]),
                    max((m.feed_lag_ms for m in rows), default=0.0),
                    len(rows),
                )
            )
    report = BenchReport(
        machine=machine or machine_info(),
        config=config or {},
        summaries=summaries,
        ratios=ratios,
        sessions=levels,
        targets=[],
        measurements=list(everything),
        session_measurements=list(sessions),
        preemption=preemption(everything),
    )
    report.targets = targets(report)
    return report


def preemption(measurements: Sequence[Measurement]) -> list[PreemptionSummary]:
    """Ours per language and preemptive setting: endpoint, v2v, wasted LLM requests."""
    summaries: list[PreemptionSummary] = []
    order = list(PREEMPTIVE_SETTINGS)
    keys = sorted(
        {(m.language, m.preemptive) for m in measurements if m.preemptive is not None},
        key=lambda k: (k[0], order.index(k[1]) if k[1] in order else len(order)),
    )
    for language, setting in keys:
        rows = [m for m in measurements if m.language == language and m.preemptive == setting]
        turns = sum(m.turns for m in rows)
        wasted = sum(m.wasted_llm_requests for m in rows)
        summaries.append(
            PreemptionSummary(
                language,
                setting,
                len(rows),
                percentiles([m.endpoint_ms for m in rows]),
                percentiles([m.v2v_ms for m in rows]),
                round(wasted / turns, 3) if turns else None,
                turns,
                sum(m.preemptive_played for m in rows),
                percentiles([m.preemptive_head_start_ms for m in rows]),
            )
        )
    return summaries


def targets(report: BenchReport) -> list[Target]:
    """The issue's targets for English (not asserted anywhere; reported)."""
    ours = report.summary("ours", "en")
    if ours is None:
        return []
    v2v_ratio = next(
        (r.p50_ratio for r in report.ratios if r.language == "en" and r.metric == "v2v_ms"), None
    )
    endpoint = ours.metrics["endpoint_ms"].p50
    bargein = ours.metrics["bargein_stop_ms"].p50

    def check(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    return [
        Target("v2v p50 ours/baseline", "<= 0.4", v2v_ratio, check(v2v_ratio, 0.4)),
        Target("endpointing p50 (ours)", "<= 350 ms", endpoint, check(endpoint, 350)),
        Target("barge-in stop p50 (ours)", "<= 250 ms", bargein, check(bargein, 250)),
    ]


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: BenchReport) -> str:
    """The terminal table: p50/p95 per pipeline and the ratio, per language."""
    lines: list[str] = []
    languages = sorted({s.language for s in report.summaries})
    for language in languages:
        ours, base = report.summary("ours", language), report.summary("baseline", language)
        if ours is None or base is None:
            continue
        lines.append(
            f"[{language}] {ours.calls} calls per pipeline"
            f" ({report.config.get('repeats', '?')} repeats)"
        )
        lines.append(
            f"  {'stage (ms)':<18}{'ours p50':>10}{'p95':>8}{'base p50':>10}{'p95':>8}"
            f"{'ours/base':>11}{'min-max':>15}"
        )
        for metric in METRICS:
            ratio = next(r for r in report.ratios if r.language == language and r.metric == metric)
            o, b = ours.metrics[metric], base.metrics[metric]
            spread = f"{_fmt(ratio.per_repeat_min, 2)}-{_fmt(ratio.per_repeat_max, 2)}"
            lines.append(
                f"  {_LABELS[metric]:<18}{_fmt(o.p50):>10}{_fmt(o.p95):>8}{_fmt(b.p50):>10}"
                f"{_fmt(b.p95):>8}{_fmt(ratio.p50_ratio, 2):>11}{spread:>15}"
            )
        kind = ours.error_rate_kind.upper()
        lines.append(
            f"  {kind:<18}{_fmt(ours.error_rate and ours.error_rate * 100, 1) + '%':>10}{'':>8}"
            f"{_fmt(base.error_rate and base.error_rate * 100, 1) + '%':>10}"
        )
        lines.append("")
    if len({(p.language, p.preemptive) for p in report.preemption}) > len(languages):
        lines.append("preemptive replies (ours): endpoint / v2v p50 p95 ms, wasted LLM requests")
        for p in report.preemption:
            lines.append(
                f"  [{p.language}] {p.preemptive:<7}"
                f" endpoint {_fmt(p.endpoint.p50):>5} {_fmt(p.endpoint.p95):>5}"
                f"  v2v {_fmt(p.v2v.p50):>5} {_fmt(p.v2v.p95):>5}"
                f"  wasted LLM requests per turn {_fmt(p.wasted_llm_per_turn, 2)}"
                f"  played preemptively {p.preemptive_played}/{p.turns} turns"
                + (
                    f", head start p50 {_fmt(p.head_start.p50)} ms"
                    if p.head_start is not None and p.head_start.p50 is not None
                    else ""
                )
            )
        lines.append("")
    if report.sessions:
        lines.append("sessions: v2v p50/p95 ms (worst input lag ms)")
        for level in report.sessions:
            lines.append(
                f"  {level.pipeline:<9} N={level.sessions:<3} {_fmt(level.v2v.p50):>6} / "
                f"{_fmt(level.v2v.p95):<6} ({level.feed_lag_max_ms:.0f}) over {level.calls} calls"
            )
        lines.append("")
    for target in report.targets:
        mark = {True: "met", False: "NOT met", None: "n/a"}[target.met]
        lines.append(f"target {target.name} {target.goal}: {_fmt(target.value, 2)} ({mark})")
    return "\n".join(lines).rstrip() + "\n"


def plot(report: BenchReport, path: Path) -> None:
    """Stacked stage breakdown (p50) per pipeline and language, and v2v against sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("endpoint_ms", "stt_ms", "llm_first_chunk_ms", "tts_first_ms")
    colors = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#cccccc")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    labels: list[str] = []
    for x, summary in enumerate(report.summaries):
        labels.append(f"{summary.pipeline}\n{summary.language}")
        bottom = 0.0
        for stage, color in zip(stages, colors, strict=False):
            value = summary.metrics[stage].p50 or 0.0
            left.bar(x, value, bottom=bottom, color=color, label=_LABELS[stage] if x == 0 else None)
            bottom += value
        v2v = summary.metrics["v2v_ms"].p50
        if v2v is not None:
            rest = max(0.0, v2v - bottom)
            left.bar(x, rest, bottom=bottom, color=colors[-1], label="other" if x == 0 else None)
            left.text(x, max(v2v, bottom) + 20, f"{v2v:.0f}", ha="center", fontsize=8)
    left.set_xticks(range(len(labels)), labels)
    left.set_ylabel("ms (p50)")
    left.set_title("Voice-to-voice, stage by stage (p50)")
    left.legend(fontsize=8)
    if report.sessions:
        for pipeline in PIPELINES:
            levels = [s for s in report.sessions if s.pipeline == pipeline]
            if not levels:
                continue
            n = [s.sessions for s in levels]
            right.plot(n, [s.v2v.p50 for s in levels], marker="o", label=f"{pipeline} p50")
            right.plot(n, [s.v2v.p95 for s in levels], marker="x", ls="--", label=f"{pipeline} p95")
        right.set_xlabel("simultaneous calls")
        right.set_ylabel("voice-to-voice ms")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "run with --sessions N", ha="center", va="center")
    right.set_title("Voice-to-voice vs simultaneous calls")
    figure.suptitle(f"voicebot bench on {report.machine.get('cpu', '?')}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
