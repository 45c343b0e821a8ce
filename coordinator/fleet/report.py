"""A run's outputs: metrics as JSON lines, the summary, the final model and the accuracy plot."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from msfusion.coordinator.fleet.rounds import RoundOutcome

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
MERGED_MODEL_FILE = "model-merged.safetensors"  # the merged weights, when the deployable model is another variant
PLOT_FILE = "accuracy.png"


@dataclass(frozen=True)
class RunSummary:
    """How a run ended and where its outputs are.

    Attributes:
        ok: every round was merged.
        reason: why it failed ("" on success).
        strategy: the planning strategy.
        rounds: rounds merged.
        final_metrics: test figures of the final global model.
        history: per merged round: round, test figures, overlap, devices merged.
        devices: per device: bytes down/up, peak RSS, failures, last failure.
        failures: "device: reason" for every failed or missing reply, then "device: refused: reason"
            for each device whose registration stood refused at the end (runner.py, `finish`).
        paths: name -> path of each output (model, metrics, summary, plot, logs, checkpoint).
        model_params: parameters of the global model.
        deployable: the variant written as model.safetensors ("merged" or "expected").
        variant_metrics: per variant, its "test" (and "validation") figures at the end.
        excluded: devices left out because their data cannot train the model, with the reason.
        preprocessing: the run's agreed normalization, classes or vocabulary (empty: data used as stored).
        state: "finished", "failed" or "stopped" (by `msfusion runs stop`; `--resume` continues it).
    """

    ok: bool
    reason: str
    strategy: str
    rounds: int
    final_metrics: Mapping[str, float]
    history: Sequence[Mapping[str, Any]] = ()
    devices: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    failures: Sequence[str] = ()
    paths: Mapping[str, str] = field(default_factory=dict)
    model_params: int = 0
    deployable: str = "merged"
    variant_metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    excluded: Mapping[str, str] = field(default_factory=dict)
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    state: str = "finished"


def append_metrics(out: Path, outcome: RoundOutcome, wall_s: float) -> dict[str, Any]:
    """One JSON line per round attempt (merged or not); returns the line."""
    line = {**asdict(outcome), "wall_s": wall_s}
    with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, allow_nan=True) + "\n")
    return line


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """Every metrics line written so far (both lives of a resumed run)."""
    path = out / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def device_totals(
    lines: Sequence[Mapping[str, Any]], params_at: Callable[[float], int] | None = None
) -> dict[str, dict[str, Any]]:
    """Per device: bytes down and up over all rounds, peak RSS, how its tasks ended, and what it held.

    `width_ratio` is the width it trained at in its last task; `params` the
    sub-model's parameters there (`params_at(ratio)`, when given).
    """
    totals: dict[str, dict[str, Any]] = {}
    for line in lines:
        for device, reply in line["replies"].items():
            entry = totals.setdefault(
                device, {"bytes_down": 0, "bytes_up": 0, "peak_rss_bytes": 0, "merged": 0, "failed": 0}
            )
            ratio = line.get("width_ratios", {}).get(device)
            if ratio is not None:
                entry["width_ratio"] = ratio
                if params_at is not None:
                    entry["params"] = params_at(ratio)
            entry["bytes_down"] += line["bytes_down"].get(device, 0)
            entry["bytes_up"] += line["bytes_up"].get(device, 0)
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], line["peak_rss_bytes"].get(device, 0))
            entry["merged" if reply == "merged" else "failed"] += 1
    return totals


def history(lines: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per merged round: its index, test figures, overlap and how many slices were merged."""
    return [
        {
            "round": line["round_idx"],
            "metrics": line["metrics"],
            "overlap": line["overlap"],
            "merged": sum(1 for r in line["replies"].values() if r == "merged"),
            "devices": len(line["replies"]),
        }
        for line in lines
        if line["merged"]
    ]


def failures(lines: Sequence[Mapping[str, Any]]) -> list[str]:
    """'round r: device: reason' for every reply that was not merged."""
    return [
        f"round {line['round_idx']} attempt {line['attempt']}: {device}: {reply}"
        for line in lines
        for device, reply in line["replies"].items()
        if reply != "merged"
    ]


def write_summary(out: Path, summary: RunSummary) -> Path:
    """summary.json (NaN written as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = out / SUMMARY_FILE
    path.write_text(json.dumps(clean(asdict(summary)), indent=2) + "\n", encoding="utf-8")
    return path


def plot_accuracy(out: Path, lines: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> Path | None:
    """A PNG of the global model's test metric against the round (merged rounds only)."""
    points = [(line["round_idx"], line["metrics"].get(metric)) for line in lines if line["merged"]]
    points = [(r, v) for r, v in points if v is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r + 1 for r, _ in points], [v for _, v in points], marker="o")
    ax.set(xlabel="round", ylabel=f"test {metric}", title=f"global model, {len(points)} rounds")
    ax.grid(alpha=0.3)
    path = out / PLOT_FILE
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
