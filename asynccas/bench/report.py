"""Reports of ``asynccas bench``: a summary table for terminals, JSON for machines, and one
self-contained HTML page (inline SVG, no scripts or downloads) for one or several runs side by
side: latency histograms and throughput over time."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from asynccas.bench.runner import RunResult
from asynccas.bench.stats import OpStats

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def summary(result: RunResult) -> str:
    c = result.config
    what = c["scenario"]
    if what == "fmb":
        what += f" ({c['batch']} digests, {c.get('present', 0.5):.0%} present)"
    head = (
        f"{what} against {c['endpoint']}: {result.seconds:.1f} s, concurrency"
        f" {c['concurrency']} over {c['processes']} client process(es);"
        f" client CPU {result.client_cpu:.2f} cores"
        + (f", server CPU {result.server_cpu:.2f} cores" if result.server_cpu is not None else "")
    )
    rows = [
        f"{'operation':<20} {'ops/s':>9} {'items/s':>10} {'MB/s':>8} {'p50 ms':>8} {'p90 ms':>8}"
        f" {'p99 ms':>8} {'max ms':>8}  errors"
    ]
    for label, stats in result.ops.items():
        rows.append(_row(label, stats, result.seconds))
    return "\n".join([head, *rows])


def comparison(results: Sequence[RunResult]) -> str:
    """Runs side by side: each operation's ops/s and p50/p99 per run, with each run's ops/s
    as a ratio of the first run's."""
    if len(results) < 2:
        return ""
    names = [f"[{i + 1}] {r.name}" for i, r in enumerate(results)]
    lines = ["runs: " + "; ".join(names)]
    head = f"{'operation':<20}" + "".join(
        f" {f'[{i + 1}] ops/s':>12} {'ratio':>7} {'p50 ms':>8} {'p99 ms':>8}"
        for i in range(len(results))
    )
    lines.append(head)
    labels = [label for label in results[0].ops if all(label in r.ops for r in results)]
    for label in labels:
        base = results[0].ops[label].histogram.count / results[0].seconds
        row = f"{label:<20}"
        for result in results:
            h = result.ops[label].histogram
            rate = h.count / result.seconds
            ratio = f"{rate / base:.2f}x" if base else "-"
            row += (f" {rate:>12.1f} {ratio:>7} {h.percentile(50) * 1e3:>8.2f}"
                    f" {h.percentile(99) * 1e3:>8.2f}")  # fmt: skip
        lines.append(row)
    return "\n".join(lines)


def _row(label: str, stats: OpStats, seconds: float) -> str:
    h = stats.histogram
    errors = ", ".join(f"{code}: {n}" for code, n in sorted(stats.errors.items())) or "none"
    if stats.corruptions:
        errors += f"; CORRUPTED: {stats.corruptions}"
    return (
        f"{label:<20} {h.count / seconds:>9.1f} {stats.items / seconds:>10.1f}"
        f" {stats.bytes / seconds / 1e6:>8.1f} {h.percentile(50) * 1e3:>8.2f}"
        f" {h.percentile(90) * 1e3:>8.2f} {h.percentile(99) * 1e3:>8.2f} {h.max * 1e3:>8.2f}  {errors}"
    )


def to_html(results: Sequence[RunResult]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>asynccas bench</title>",
        "<style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
        "svg{background:#fafafa;margin:4px}</style>",
        "<h1>asynccas bench</h1>",
    ]
    for index, result in enumerate(results):
        c = result.config
        colour = _COLOURS[index % len(_COLOURS)]
        against = html.escape(c["endpoint"])
        parts.append(
            f"<h2 style='color:{colour}'>Run {index + 1}: {html.escape(result.name)}</h2>"
            f"<p>{html.escape(c['scenario'])} against {against};"
            f" {html.escape(c['date'])}, {result.seconds:.1f} s,"
            f" concurrency {c['concurrency']}, {c['processes']} client process(es), client CPU"
            f" {result.client_cpu:.2f} cores"
            + (
                f", server CPU {result.server_cpu:.2f} cores"
                if result.server_cpu is not None
                else ""
            )
            + "</p>"
        )
        parts.append(
            "<table><tr><th>operation</th><th>ops/s</th><th>items/s</th><th>MB/s</th><th>p50 ms</th>"
            "<th>p90 ms</th><th>p99 ms</th><th>max ms</th><th>errors</th></tr>"
        )
        for label, stats in result.ops.items():
            cells = _row(label, stats, result.seconds).split(None, 8)
            parts.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
        parts.append("</table>")
    if len(results) > 1:
        parts.append("<h2>Side by side</h2><pre>" + html.escape(comparison(results)) + "</pre>")
    labels = sorted({label for result in results for label in result.ops})
    for label in labels:
        series = [(i, r.ops[label]) for i, r in enumerate(results) if label in r.ops]
        seconds = [int(results[i].seconds) for i, _ in series]
        parts.append(f"<h3>{html.escape(label)}</h3>")
        parts.append(_legend([(i, results[i].name) for i, _ in series]))
        parts.append(_histogram_svg(series))
        parts.append(_timeline_svg(series, seconds))
    return "\n".join(parts)


def _legend(entries: Sequence[tuple[int, str]]) -> str:
    return (
        "<p>"
        + " &nbsp; ".join(
            f"<span style='color:{_COLOURS[i % len(_COLOURS)]}'>&#9632; [{i + 1}] {html.escape(name)}"
            "</span>"
            for i, name in entries
        )
        + "</p>"
    )


def _axes(width: int, height: int, pad: int, x_label: str, y_label: str) -> str:
    return (
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}'"
        " stroke='#444'/>"
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' stroke='#444'/>"
        f"<text x='{width - pad}' y='{height - 2}' font-size='10' text-anchor='end'>"
        f"{html.escape(x_label)}</text>"
        f"<text x='4' y='{pad - 6}' font-size='10'>{html.escape(y_label)}</text>"
    )


def _histogram_svg(series: Sequence[tuple[int, OpStats]]) -> str:
    width, height, pad = 520, 200, 30
    points = [(b, n) for _, s in series for b, n in s.histogram.buckets()]
    if not points:
        return ""
    low = math.log10(min(b for b, _ in points))
    high = math.log10(max(b for b, _ in points)) + 0.05
    shapes = []
    top = max(n / (s.histogram.count or 1) for _, s in series for _, n in s.histogram.buckets())
    for index, stats in series:
        total = stats.histogram.count or 1
        colour = _COLOURS[index % len(_COLOURS)]
        for bucket, n in stats.histogram.buckets():  # one bar per 2%-wide latency bucket
            x = pad + (math.log10(bucket) - low) / (high - low or 1) * (width - 2 * pad)
            bar = n / total / top * (height - 2 * pad)
            shapes.append(
                f"<rect x='{x:.1f}' y='{height - pad - bar:.1f}' width='2' height='{bar:.1f}'"
                f" fill='{colour}' fill-opacity='0.7'/>"
            )
    ticks = "".join(
        f"<text x='{pad + (e - low) / (high - low or 1) * (width - 2 * pad):.0f}'"
        f" y='{height - pad + 12}' font-size='10'>{_ms(10**e)}</text>"
        for e in range(math.ceil(low), math.floor(high) + 1)
    )
    axes = _axes(width, height, pad, "latency (log scale)", f"share, top {top:.0%}")
    return (
        f"<svg width='{width}' height='{height}'><text x='{pad + 60}' y='16' font-size='11'>"
        f"operations by latency</text>{axes}{ticks}{''.join(shapes)}</svg>"
    )


def _timeline_svg(series: Sequence[tuple[int, OpStats]], full_seconds: Sequence[int]) -> str:
    """Completions per second; each run's last, partial second is left out, since plotting it
    would draw a drop that did not happen."""
    width, height, pad = 520, 200, 30
    seconds = max(max(full_seconds, default=0), 1)
    peak = max(
        (max((n for t, n in s.per_second.items() if t < full), default=0)
         for (_, s), full in zip(series, full_seconds, strict=True)),
        default=0,
    ) or 1  # fmt: skip
    shapes = []
    for (index, stats), full in zip(series, full_seconds, strict=True):
        line = " ".join(
            f"{pad + t / max(seconds - 1, 1) * (width - 2 * pad):.1f},"
            f"{height - pad - stats.per_second.get(t, 0) / peak * (height - 2 * pad):.1f}"
            for t in range(full)
        )
        shapes.append(
            f"<polyline fill='none' stroke='{_COLOURS[index % len(_COLOURS)]}' points='{line}'/>"
        )
    axes = _axes(width, height, pad, f"seconds (0 to {seconds})", f"ops/s (top {peak})")
    return (
        f"<svg width='{width}' height='{height}'><text x='{pad + 60}' y='16' font-size='11'>"
        f"completions per second</text>{axes}{''.join(shapes)}</svg>"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:g} ms" if seconds < 1 else f"{seconds:g} s"
