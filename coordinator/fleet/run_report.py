"""The run report: one self-contained HTML page of a finished or crashed run, and the PNGs it shows.

`write_report(run_dir)` reads what a run folder holds (metrics.jsonl; summary.json
once the run finished; the run file, events.jsonl's `run_started` and the
checkpoint's state when present) and writes `report.html` there, with its charts
as PNGs in `report/`. The charts are also embedded as data URIs, so the HTML file
alone is the whole report: it loads nothing else and runs no script. Every text
shown is escaped.

The page: the run's state; its test metric (accuracy, or perplexity for
language models) by round, with other strategies' final figures from a
benchmark JSON as horizontal lines; per device its peak memory against its
budget, step time, bytes down and up per round and width over rounds; every
failure (device, round, reason); and the run's config.

Written at the end of every coordinator run and by `msfusion report RUN_DIR`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from msfusion.atomic import atomic_write
from msfusion.coordinator.fleet.checkpoint import STATE_FILE
from msfusion.coordinator.fleet.report import METRICS_FILE, SUMMARY_FILE
from msfusion.errors import ConfigError, DataError

REPORT_FILE = "report.html"
REPORT_DIR = "report"  # the PNGs, and the run's config as the coordinator had it
CONFIG_FILE = "config.json"
EVENTS_FILE = "events.jsonl"  # the coordinator's event stream (coordinator/fleet/events.py)
CHECKPOINT_DIR = "checkpoint"  # runner.CHECKPOINT_DIR
REDACTED = "***"
SECRET_KEYS = frozenset({"password"})
MAX_DEVICE_LINES = 48  # beyond this many devices the report's charts show their spread, not a line each
MAX_LEGEND = 12  # more devices than this: no legend (the table names them)

# The charts, by file name in report/ (a chart without data is left out and its old file removed).
METRIC_PNG = "metric.png"
MEMORY_PNG = "memory.png"
STEP_TIME_PNG = "step-time.png"
BYTES_PNG = "bytes.png"
WIDTH_PNG = "width.png"
CHART_FILES = (METRIC_PNG, MEMORY_PNG, STEP_TIME_PNG, BYTES_PNG, WIDTH_PNG)


@dataclass(frozen=True)
class DeviceRow:
    """One device over the whole run.

    Attributes:
        device: its id.
        width: the width ratio of its last task (None: not recorded).
        merged: its slices merged.
        failed: its tasks that failed, were rejected or got no reply.
        peak_rss_bytes: the highest peak RSS it reported (None: never reported).
        budget_bytes: its memory budget as last registered (None: not recorded).
        step_time_s: its mean reported time per training step (None: never reported).
        bytes_down: bytes sent to it over all rounds.
        bytes_up: bytes received from it over all rounds.
    """

    device: str
    width: float | None
    merged: int
    failed: int
    peak_rss_bytes: int | None
    budget_bytes: int | None
    step_time_s: float | None
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class Failure:
    """A task that did not end in a merged slice, or a device left out of the run.

    Attributes:
        device: the device.
        round: the round, counted from 1 ("" for a device left out of the whole run).
        attempt: the attempt at that round, counted from 1 ("" as for `round`).
        reason: what the coordinator recorded.
    """

    device: str
    round: str
    attempt: str
    reason: str


@dataclass(frozen=True)
class Baseline:
    """A strategy's final figure in a benchmark: the mean over its rows.

    Attributes:
        label: the strategy (and its budget, where the benchmark has several).
        value: the mean final test figure.
        rows: how many benchmark rows it is the mean of.
    """

    label: str
    value: float
    rows: int


@dataclass(frozen=True)
class Chart:
    """One chart of the report.

    Attributes:
        title: its heading.
        file: its PNG in report/ (None: no data to draw).
        note: shown under it (or instead of it).
    """

    title: str
    file: Path | None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------
# Reading the run folder


def is_run_folder(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run's outputs: metrics, summary, event stream or checkpoint."""
    return any(
        (run_dir / name).is_file()
        for name in (METRICS_FILE, SUMMARY_FILE, EVENTS_FILE, f"{CHECKPOINT_DIR}/{STATE_FILE}")
    )


def read_json_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSON-lines file, skipping what does not parse (a crash's half-written last line).

    Returns:
        The objects, and how many non-blank lines were skipped (no file: none of either).
    """
    if not path.is_file():
        return [], 0
    lines: list[dict[str, Any]] = []
    skipped = 0
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError:
            skipped += 1
            continue
        if isinstance(value, dict):
            lines.append(value)
        else:
            skipped += 1
    return lines, skipped


def read_json(path: Path) -> tuple[Any, str]:
    """A JSON file's content, or None and why it could not be read ("" when it does not exist)."""
    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError) as exc:
        return None, f"{path.name} could not be read ({exc})"


def run_metric(lines: Sequence[Mapping[str, Any]]) -> str:
    """The figure a run is judged on: perplexity for a language model, accuracy otherwise."""
    return "perplexity" if any("perplexity" in (line.get("metrics") or {}) for line in lines) else "accuracy"


def number(value: Any) -> float | None:
    """`value` as a finite float, or None (booleans, NaN, text and the rest)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def round_of(line: Mapping[str, Any]) -> int:
    """The round of a metrics line, counted from 1."""
    return int(line.get("round_idx", 0)) + 1


def metric_points(lines: Sequence[Mapping[str, Any]], metric: str) -> list[tuple[int, float]]:
    """(round, figure) of every merged round with a finite `metric` (lines without `merged` are merged rounds)."""
    points = []
    for line in lines:
        value = number((line.get("metrics") or {}).get(metric))
        if line.get("merged", True) and value is not None:
            points.append((round_of(line), value))
    return points


def per_device(lines: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """Per device, (round, value) of one per-device field of the metrics lines (`bytes_down`, `width_ratios` ...)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        values = line.get(key)
        if not isinstance(values, Mapping):
            continue
        for device, value in values.items():
            if (figure := number(value)) is not None:
                series.setdefault(str(device), []).append((round_of(line), figure))
    return series


def device_ids(lines: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every device a metrics line names, sorted."""
    found: set[str] = set()
    for line in lines:
        found.update(str(d) for d in line.get("devices") or ())
        for key in ("replies", "bytes_down", "bytes_up", "peak_rss_bytes", "budget_bytes", "width_ratios"):
            if isinstance(line.get(key), Mapping):
                found.update(str(d) for d in line[key])
    return sorted(found)


def device_rows(lines: Sequence[Mapping[str, Any]]) -> list[DeviceRow]:
    """One row per device: its width, tasks merged and failed, peak memory, budget, step time and traffic."""
    fields = ("width_ratios", "peak_rss_bytes", "budget_bytes", "step_time_s", "bytes_down", "bytes_up")
    series = {key: per_device(lines, key) for key in fields}
    rows = []
    for device in device_ids(lines):
        replies = [(line.get("replies") or {}).get(device) for line in lines]
        values = {key: [v for _, v in series[key].get(device, [])] for key in fields}
        rows.append(
            DeviceRow(
                device=device,
                width=values["width_ratios"][-1] if values["width_ratios"] else None,
                merged=sum(1 for r in replies if r == "merged"),
                failed=sum(1 for r in replies if r is not None and r != "merged"),
                peak_rss_bytes=int(max(values["peak_rss_bytes"])) if values["peak_rss_bytes"] else None,
                budget_bytes=int(values["budget_bytes"][-1]) if values["budget_bytes"] else None,
                step_time_s=sum(values["step_time_s"]) / len(values["step_time_s"]) if values["step_time_s"] else None,
                bytes_down=int(sum(values["bytes_down"])),
                bytes_up=int(sum(values["bytes_up"])),
            )
        )
    return rows


def failure_rows(lines: Sequence[Mapping[str, Any]], excluded: Mapping[str, Any] | None = None) -> list[Failure]:
    """Every reply that was not "merged", in the order of the run, then the devices left out of it."""
    rows = [
        Failure(str(device), str(round_of(line)), str(int(line.get("attempt", 0)) + 1), str(reply))
        for line in lines
        for device, reply in (line.get("replies") or {}).items()
        if reply != "merged"
    ]
    rows += [Failure(str(device), "", "", f"excluded: {reason}") for device, reason in (excluded or {}).items()]
    return rows


def last_event(events: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any] | None:
    """The last event of `kind` (a resumed run has one per life), without its bookkeeping fields."""
    found = [e for e in events if e.get("kind") == kind]
    if not found:
        return None
    return {k: v for k, v in found[-1].items() if k not in ("seq", "t", "kind")}


def plain(value: Any) -> Any:
    """A config (dataclasses, enums, paths) as JSON values, with every secret (a password) redacted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if str(k) in SECRET_KEYS and v is not None else plain(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def redact_toml(text: str) -> str:
    """A run file with every `password = ...` value replaced."""
    return re.sub(r"(?mi)^(\s*password\s*=\s*).*$", rf'\g<1>"{REDACTED}"', text)


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def benchmark_rows(data: Any) -> list[Mapping[str, Any]]:
    """The rows of a benchmark JSON that name a strategy (its "runs", "results" or "rows" list, or the list itself)."""
    if isinstance(data, Mapping):
        data = next((data[k] for k in ("runs", "results", "rows") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        return []
    return [row for row in data if isinstance(row, Mapping) and isinstance(row.get("strategy"), str)]


def row_final(row: Mapping[str, Any], metric: str) -> float | None:
    """A benchmark row's final test `metric`, or None.

    Read from, in order: "final" (bench/results/full-*.json, whose rows name their
    "metric"); "test", a mapping of the figures, or of each variant's figures,
    where the row's "deployable" variant (else "merged") is taken
    (bench/results/scaling.json); the last point of "curve".
    """
    if row.get("metric", metric) != metric:
        return None
    if (final := number(row.get("final"))) is not None:
        return final
    test = row.get("test")
    if isinstance(test, Mapping):
        if (direct := number(test.get(metric))) is not None:
            return direct
        variant = row.get("deployable") if row.get("deployable") in test else "merged"
        figures = test.get(variant)
        if isinstance(figures, Mapping) and (value := number(figures.get(metric))) is not None:
            return value
    curve = row.get("curve")
    if row.get("metric", "accuracy") == metric and isinstance(curve, list) and curve:
        return number(curve[-1])
    return None


def baselines(
    data: Any, metric: str, devices: int | None = None, exclude: str | None = None
) -> tuple[list[Baseline], list[str]]:
    """Each strategy's mean final figure in a benchmark, and notes on what was left out.

    Args:
        data: the benchmark JSON's content.
        metric: the run's figure ("accuracy" or "perplexity").
        devices: the run's fleet size: when some rows have this many "devices", only those count.
        exclude: the run's own strategy (not drawn: the run's curve is that strategy).

    Returns:
        The baselines, by label, and notes (an unknown format gives none and a note).
    """
    scored = [(row, value) for row in benchmark_rows(data) if (value := row_final(row, metric)) is not None]
    if not scored:
        return [], [
            f"no rows with a strategy and a final test {metric} (known formats: bench/results/scaling.json, "
            "bench/results/full-*.json): ignored"
        ]
    notes = []
    if devices is not None and any(row.get("devices") == devices for row, _ in scored):
        if any(row.get("devices") != devices for row, _ in scored):
            notes.append(f"only its rows of {devices} devices, as in this run")
        scored = [(row, value) for row, value in scored if row.get("devices") == devices]
    budgets = {str(row["budget"]) for row, _ in scored if "budget" in row}
    groups: dict[str, list[float]] = {}
    for row, value in scored:
        if row["strategy"] == exclude:
            continue
        label = row["strategy"] + (f" ({row['budget']})" if len(budgets) > 1 and "budget" in row else "")
        groups.setdefault(label, []).append(value)
    if exclude is not None and any(row["strategy"] == exclude for row, _ in scored):
        notes.append(f"its {exclude} rows are not drawn: this run is {exclude}")
    return [Baseline(label, sum(v) / len(v), len(v)) for label, v in sorted(groups.items())], notes


# ---------------------------------------------------------------------------------------------------------------
# Charts


def _axes(width: float = 7.0, height: float = 3.6, rows: int = 1) -> tuple[Any, Any]:
    """A fresh figure (no pyplot: no global state, safe off the main thread) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows))
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return path


def _round_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_metric(path: Path, points: Sequence[tuple[int, float]], metric: str, lines: Sequence[Baseline]) -> Path:
    """The run's test `metric` by round, and each baseline as a labelled horizontal line."""
    fig, (ax,) = _axes(8.0, 4.2)
    if points:
        ax.plot([r for r, _ in points], [v for _, v in points], marker="o", color="black", label="this run")
    for index, line in enumerate(lines):
        color = f"C{index % 10}"
        ax.axhline(line.value, color=color, linestyle="--", linewidth=1, label=line.label)
        ax.text(1.01, line.value, line.label, transform=ax.get_yaxis_transform(), va="center", fontsize=8, color=color)
    _round_axis(ax)
    ax.set(ylabel=f"test {metric}", title=f"global model, {len(points)} merged rounds")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_memory(path: Path, rows: Sequence[DeviceRow]) -> Path:
    """Per device a bar of its peak RSS (red above its budget) and a black tick at its budget (MiB).

    Beyond `MAX_DEVICE_LINES` devices: every device's peak, sorted, against the budgets (no bar per device).
    """
    if len(rows) > MAX_DEVICE_LINES:
        fig, (ax,) = _axes(8.0, 3.8)
        ax.plot(sorted((r.peak_rss_bytes or 0) / 2**20 for r in rows), label="peak RSS, sorted")
        ax.plot(
            sorted(r.budget_bytes / 2**20 for r in rows if r.budget_bytes is not None), "k--", label="budget, sorted"
        )
        ax.set(xlabel="devices", ylabel="MiB", title=f"peak memory against budget, {len(rows)} devices")
        ax.legend(loc="best", fontsize=8)
        return _save(fig, path)
    fig, (ax,) = _axes(max(6.0, min(20.0, 0.35 * len(rows))), 3.8)
    xs = range(len(rows))
    peaks = [(r.peak_rss_bytes or 0) / 2**20 for r in rows]
    over = [r.budget_bytes is not None and (r.peak_rss_bytes or 0) > r.budget_bytes for r in rows]
    ax.bar(xs, peaks, color=["tab:red" if o else "tab:blue" for o in over], label="peak RSS")
    budgets = [(x, r.budget_bytes / 2**20) for x, r in zip(xs, rows) if r.budget_bytes is not None]
    if budgets:
        ax.hlines(
            [b for _, b in budgets],
            [x - 0.4 for x, _ in budgets],
            [x + 0.4 for x, _ in budgets],
            colors="black",
            linewidth=2,
            label="budget",
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.device for r in rows], rotation=90 if len(rows) > 8 else 0, fontsize=8)
    ax.set(ylabel="MiB", title="peak memory against budget")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _device_lines(ax: Any, series: Mapping[str, Sequence[tuple[int, float]]], scale: float = 1.0) -> None:
    if len(series) > MAX_DEVICE_LINES:  # a large fleet: the spread per round, not a line per device
        by_round: dict[int, list[float]] = {}
        for points in series.values():
            for r, v in points:
                by_round.setdefault(r, []).append(v / scale)
        rounds = sorted(by_round)
        quantiles = np.array([np.quantile(by_round[r], [0.0, 0.5, 1.0]) for r in rounds])
        ax.fill_between(rounds, quantiles[:, 0], quantiles[:, 2], alpha=0.3, label=f"min-max of {len(series)} devices")
        ax.plot(rounds, quantiles[:, 1], marker=".", label="median")
        ax.legend(loc="best", fontsize=7)
        _round_axis(ax)
        return
    for device, points in sorted(series.items()):
        ax.plot([r for r, _ in points], [v / scale for _, v in points], marker=".", label=device)
    if 0 < len(series) <= MAX_LEGEND:
        ax.legend(loc="best", fontsize=7, ncol=2)
    _round_axis(ax)


def plot_series(path: Path, series: Mapping[str, Sequence[tuple[int, float]]], ylabel: str, title: str) -> Path:
    """One line per device of a per-round figure (step time, width)."""
    fig, (ax,) = _axes()
    _device_lines(ax, series)
    ax.set(ylabel=ylabel, title=title)
    return _save(fig, path)


def plot_bytes(
    path: Path, down: Mapping[str, Sequence[tuple[int, float]]], up: Mapping[str, Sequence[tuple[int, float]]]
) -> Path:
    """Bytes sent to and received from each device per round (MB), one panel each."""
    fig, (top, bottom) = _axes(rows=2)
    _device_lines(top, down, 1e6)
    top.set(ylabel="MB", title="bytes down (coordinator to device) per round")
    _device_lines(bottom, up, 1e6)
    bottom.set(ylabel="MB", title="bytes up (device to coordinator) per round")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.state { padding: 0.5em 0.8em; border-radius: 4px; font-weight: bold; }
.state.ok { background: #e3f5e1; } .state.failed { background: #fbe3e1; } .state.unfinished { background: #fff2d6; }
.over { color: #b00; font-weight: bold; } .note { color: #555; font-style: italic; }
"""

# Nothing from elsewhere: only inline styles and data: images, no script.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A figure for a table: integers with separators, floats to 4 significant digits, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def fmt_bytes(value: int | None, unit: int = 2**20, name: str = "MiB") -> str:
    return "—" if value is None else f"{value / unit:,.1f} {name}"


def fmt_metrics(metrics: Any) -> str:
    """'accuracy 0.8123, loss 0.5' (a mapping), else the value as text."""
    if isinstance(metrics, Mapping):
        return ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items()) or "—"
    return fmt(metrics)


@dataclass(frozen=True)
class Markup:
    """HTML already escaped, for a table cell."""

    html: str


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped, except those given as `Markup`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell.html if isinstance(cell, Markup) else esc(cell)
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""  # no headings: a list of fields
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def image(path: Path, alt: str) -> str:
    """An <img> whose source is the PNG itself, as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def chart_html(chart: Chart) -> str:
    parts = [f"<h3>{esc(chart.title)}</h3>"]
    if chart.file is not None:
        parts.append(image(chart.file, chart.title))
    if chart.note:
        parts.append(f'<p class="note">{esc(chart.note)}</p>')
    return "\n".join(parts)


def pre_json(value: Any) -> str:
    return f"<pre>{esc(json.dumps(plain(value), indent=2))}</pre>"


def fields_table(fields: Mapping[str, Any]) -> str:
    """A mapping as a table: scalars inline, the rest as JSON (long ones folded)."""
    rows: list[tuple[str, str | Markup]] = []
    for key, value in fields.items():
        if isinstance(value, (Mapping, list, tuple)):
            text = json.dumps(plain(value), indent=2)
            folded = len(text) > 400
            block = f"<pre>{esc(text)}</pre>"
            rows.append(
                (
                    key,
                    Markup(
                        f"<details><summary>{esc(len(value))} entries</summary>{block}</details>" if folded else block
                    ),
                )
            )
        else:
            rows.append((key, fmt(value) if not isinstance(value, str) else value))
    return table(("field", "value"), rows)


# ---------------------------------------------------------------------------------------------------------------
# The report


def _overview(
    run_dir: Path,
    summary: Mapping[str, Any] | None,
    started: Mapping[str, Any] | None,
    lines: Sequence[Mapping[str, Any]],
    devices: int,
    notes: Sequence[str],
) -> str:
    """The state banner and the overview table (state, strategy, rounds, devices, final figures, notes)."""
    merged = [line for line in lines if line.get("merged", True)]
    if summary is not None:
        state = str(summary.get("state") or ("finished" if summary.get("ok") else "failed"))
        banner = (
            "ok" if summary.get("ok") else "failed",
            state + (f": {summary['reason']}" if summary.get("reason") else ""),
        )
    else:
        banner = (
            "unfinished",
            "did not finish: no summary.json (the coordinator crashed, was killed, or is still running)",
        )
    strategy = (summary or {}).get("strategy") or (started or {}).get("strategy") or "unknown"
    final = (summary or {}).get("final_metrics") or (merged[-1].get("metrics") if merged else None)
    wall = sum(v for line in lines if (v := number(line.get("wall_s"))) is not None)
    rows: list[tuple[str, Any]] = [
        ("run folder", str(run_dir)),
        ("state", banner[1]),
        ("strategy", strategy),
        ("rounds merged", f"{len(merged)} of {len(lines)} round attempts"),
        ("devices", devices),
        ("final test figures", fmt_metrics(final) if final else "—"),
    ]
    if summary is not None and summary.get("variant_metrics"):
        variants = {name: fmt_metrics((v or {}).get("test")) for name, v in summary["variant_metrics"].items()}
        rows.append(
            (
                "deployable model",
                f"{summary.get('deployable', 'merged')} ({'; '.join(f'{k}: {v}' for k, v in variants.items())})",
            )
        )
    if summary is not None and summary.get("model_params"):
        rows.append(("global model parameters", fmt(summary["model_params"])))
    rows.append(("time in rounds", f"{wall:,.1f} s" if lines else "—"))
    rows += [("note", note) for note in notes]
    return f'<p class="state {banner[0]}">{esc(banner[1])}</p>' + table(("", ""), rows)


def _device_table(rows: Sequence[DeviceRow]) -> str:
    cells = []
    for r in rows:
        over = r.budget_bytes is not None and r.peak_rss_bytes is not None and r.peak_rss_bytes > r.budget_bytes
        share = f"{r.peak_rss_bytes / r.budget_bytes:.0%}" if r.peak_rss_bytes is not None and r.budget_bytes else "—"
        cells.append(
            (
                r.device,
                fmt(r.width),
                r.merged,
                r.failed,
                fmt_bytes(r.peak_rss_bytes),
                fmt_bytes(r.budget_bytes),
                Markup(f'<span class="over">{esc(share)}</span>') if over else share,
                "—" if r.step_time_s is None else f"{r.step_time_s:.4g} s",
                fmt_bytes(r.bytes_down, 10**6, "MB"),
                fmt_bytes(r.bytes_up, 10**6, "MB"),
            )
        )
    headers = ("device", "width", "merged", "failed", "peak RSS", "budget", "peak / budget", "step time", "down", "up")
    return table(headers, cells, numeric=range(1, 10))


def _config_html(
    run_dir: Path, config: Any, started: Mapping[str, Any] | None, summary: Mapping[str, Any] | None
) -> str:
    parts = []
    if config is not None:
        parts.append(f"<h3>run config (as the coordinator had it, {esc(REPORT_DIR + '/' + CONFIG_FILE)})</h3>")
        parts.append(pre_json(config))
    for path in sorted(run_dir.glob("*.toml")):
        try:
            text = redact_toml(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            text = f"could not be read ({exc})"
        parts.append(f"<h3>run file {esc(path.name)}</h3><pre>{esc(text)}</pre>")
    if started is not None:
        parts.append(f"<h3>run started ({esc(EVENTS_FILE)})</h3>" + fields_table(plain(started)))
    state, _ = read_json(run_dir / CHECKPOINT_DIR / STATE_FILE)
    if isinstance(state, Mapping):
        parts.append(f"<h3>checkpoint ({esc(CHECKPOINT_DIR + '/' + STATE_FILE)})</h3>" + fields_table(state))
    if summary is not None:
        parts.append(f"<h3>{esc(SUMMARY_FILE)}</h3>" + fields_table(summary))
    return "\n".join(parts) or '<p class="note">no config recorded in this folder</p>'


def _charts(
    charts_dir: Path,
    lines: Sequence[Mapping[str, Any]],
    rows: Sequence[DeviceRow],
    metric: str,
    drawn: Sequence[Baseline],
) -> list[Chart]:
    """Draw every chart there is data for into `charts_dir` (removing an older report's): metric first."""
    for name in CHART_FILES:
        (charts_dir / name).unlink(missing_ok=True)
    points = metric_points(lines, metric)
    memory = [r for r in rows if r.peak_rss_bytes is not None or r.budget_bytes is not None]
    step = per_device(lines, "step_time_s")
    down, up = per_device(lines, "bytes_down"), per_device(lines, "bytes_up")
    width = per_device(lines, "width_ratios")
    return [
        Chart(
            f"test {metric} by round",
            plot_metric(charts_dir / METRIC_PNG, points, metric, drawn) if points else None,
            "" if points else "no merged round: nothing to plot",
        ),
        Chart(
            "peak memory against budget",
            plot_memory(charts_dir / MEMORY_PNG, memory) if memory else None,
            "" if memory else "no device reported its memory",
        ),
        Chart(
            "step time per round",
            plot_series(charts_dir / STEP_TIME_PNG, step, "seconds per step", "step time per device") if step else None,
            "" if step else "no device reported its step time",
        ),
        Chart(
            "bytes down and up per round",
            plot_bytes(charts_dir / BYTES_PNG, down, up) if down or up else None,
            "" if down or up else "no traffic recorded",
        ),
        Chart(
            "width per device over rounds",
            plot_series(charts_dir / WIDTH_PNG, width, "width ratio", "width each device trained at")
            if width
            else None,
            "" if width else "no widths recorded",
        ),
    ]


def _benchmark(
    benchmark: Path | None, metric: str, devices: int | None, strategy: str | None
) -> tuple[list[Baseline], list[str]]:
    """The baselines of a benchmark file (none without one) and the notes on it."""
    if benchmark is None:
        return [], []
    data, unreadable = read_json(benchmark)
    drawn, notes = baselines(data, metric, devices, strategy) if not unreadable else ([], [f"{unreadable}: ignored"])
    return drawn, [f"benchmark {benchmark.name}: {note}" for note in notes]


def _metric_html(chart: Chart, metric: str, drawn: Sequence[Baseline], notes: Sequence[str]) -> str:
    parts = [chart_html(chart)]
    if drawn:
        rows = [(b.label, fmt(b.value), b.rows) for b in drawn]
        parts.append(table(("benchmark strategy", f"final test {metric}", "rows (mean of)"), rows, numeric=(1, 2)))
    parts += [f'<p class="note">{esc(note)}</p>' for note in notes]
    return "\n".join(parts)


def _failures_html(failures: Sequence[Failure]) -> str:
    if not failures:
        return '<p class="note">no failures</p>'
    return (
        f'<p class="note">rounds and attempts count from 1 ({esc(METRICS_FILE)}\'s round_idx and attempt + 1)</p>'
        + table(("device", "round", "attempt", "reason"), [(f.device, f.round, f.attempt, f.reason) for f in failures])
    )


def render_page(title: str, sections: Sequence[tuple[str, str, str]], footer: str) -> str:
    """The whole HTML page; `sections` are (id, heading, HTML body) and `title` and `footer` plain text."""
    body = "\n".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>\n{html_}\n</section>' for i, h, html_ in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{esc(title)}</h1>
{body}
<footer><p class="note">{esc(footer)}</p></footer>
</body>
</html>
"""


def report_title(run_dir: Path) -> str:
    """The report's title (and the page's): it names the run folder."""
    return f"msfusion run report: {run_dir.resolve().name}"


def write_report(run_dir: Path, benchmark: Path | None = None, config: Any = None) -> Path:
    """Write `run_dir/report.html` (self-contained) and its charts in `run_dir/report/`.

    Args:
        run_dir: a run's output folder, finished or not (metrics.jsonl may be short or missing).
        benchmark: a benchmark JSON (e.g. bench/results/scaling.json) whose other strategies'
            final figures are drawn as baselines; a format it cannot read is ignored with a note.
        config: the run's config (a `CoordinatorConfig`, or any dataclass or mapping); kept as
            report/config.json with secrets redacted, which later reports of the folder show.

    Returns:
        The report's path.

    Raises:
        ConfigError: `run_dir` is not a folder, or `benchmark` is not a file.
        DataError: `run_dir` holds no run (no metrics.jsonl, summary.json, events.jsonl or checkpoint).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder (give a run's output folder, e.g. runs/simulate)")
    if not is_run_folder(run_dir):
        raise DataError(
            f"{run_dir} is not a run folder: it has no {METRICS_FILE}, {SUMMARY_FILE}, {EVENTS_FILE} "
            f"or {CHECKPOINT_DIR}/{STATE_FILE}"
        )
    if benchmark is not None and not Path(benchmark).is_file():
        raise ConfigError(f"benchmark file {benchmark} does not exist")
    charts_dir = run_dir / REPORT_DIR
    charts_dir.mkdir(exist_ok=True)
    if config is not None:
        atomic_write(charts_dir / CONFIG_FILE, (json.dumps(plain(config), indent=2) + "\n").encode())
    saved_config, config_note = read_json(charts_dir / CONFIG_FILE)

    lines, skipped = read_json_lines(run_dir / METRICS_FILE)
    summary, summary_note = read_json(run_dir / SUMMARY_FILE)
    summary = summary if isinstance(summary, Mapping) else None
    started = last_event(read_json_lines(run_dir / EVENTS_FILE)[0], "run_started")
    notes = [n for n in (config_note, summary_note) if n]
    if not lines:
        what = f"{METRICS_FILE} has no rounds" if (run_dir / METRICS_FILE).is_file() else f"no {METRICS_FILE}"
        notes.append(f"{what}: the run ended before its first round did")
    if skipped:
        notes.append(f"{skipped} unreadable line(s) of {METRICS_FILE} skipped (a crash mid-write)")

    rows = device_rows(lines)
    metric = run_metric(lines)
    strategy = (summary or {}).get("strategy") or (started or {}).get("strategy")
    drawn, bench_notes = _benchmark(
        Path(benchmark) if benchmark is not None else None, metric, len(rows) or None, strategy
    )
    charts = _charts(charts_dir, lines, rows, metric, drawn)
    devices = _device_table(rows) if rows else '<p class="note">no device took part in a round</p>'
    sections = [
        ("overview", "Overview", _overview(run_dir, summary, started, lines, len(rows), notes)),
        ("metric", f"Test {metric}", _metric_html(charts[0], metric, drawn, bench_notes)),
        ("devices", "Devices", devices + "\n" + "\n".join(chart_html(c) for c in charts[1:])),
        ("failures", "Failures", _failures_html(failure_rows(lines, (summary or {}).get("excluded") or {}))),
        ("config", "Config", _config_html(run_dir, saved_config, started, summary)),
    ]
    written = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    page = render_page(report_title(run_dir), sections, f"written {written} from {run_dir}")
    path = run_dir / REPORT_FILE
    atomic_write(path, page.encode("utf-8"))
    return path
