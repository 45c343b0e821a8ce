"""bench/accuracy.py's target check: the verdict it prints follows the figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rows(metric: str, finals: dict[str, float], windows: dict[str, float] | None = None) -> list[dict[str, object]]:
    windows = windows or {}
    return [
        {
            "case": "c",
            "budget": "1/16",
            "strategy": name,
            "metric": metric,
            "final": value,
            "curve": [value],
            "window_curve": [windows.get(name, float("nan"))],
        }
        for name, value in finals.items()
    ]


BASE = {"fedavg-small": 0.70, "fedavg-full": 0.80, "heterofl": 0.60, "fedrolex": 0.50}


@pytest.mark.parametrize(
    ("ours", "verdict", "closed"),
    [(0.76, "TARGET MET", "+0.60"), (0.74, "target missed", "+0.40"), (0.65, "target missed", "-0.50")],
)
def test_accuracy_target_needs_all_baselines_beaten_and_half_the_gap(ours: float, verdict: str, closed: str) -> None:
    line = _bench().target_lines(_rows("accuracy", BASE | {"msfusion": ours}))[0]
    assert line.endswith(verdict) and f"gap closed {closed}" in line


def test_a_baseline_is_credited_with_its_better_window() -> None:
    rows = _rows("accuracy", BASE | {"msfusion": 0.78}, windows={"heterofl": 0.79})
    line = _bench().target_lines(rows)[0]
    assert "loses to heterofl 0.7900" in line and line.endswith("target missed")


def test_perplexity_is_lower_is_better_and_missing_baselines_are_incomplete() -> None:
    finals = {"fedavg-small": 9.0, "fedavg-full": 7.0, "heterofl": 10.0, "fedrolex": 11.0, "msfusion": 7.5}
    line = _bench().target_lines(_rows("perplexity", finals))[0]
    assert "gap closed +0.75" in line and line.endswith("TARGET MET")
    partial = _bench().target_lines(_rows("perplexity", {"msfusion": 7.5, "fedrolex": 11.0}))[0]
    assert partial.endswith("incomplete")


def test_last5_judges_the_mean_of_the_last_five_rounds() -> None:
    rows = _rows("accuracy", BASE | {"msfusion": 0.76})
    ours = next(r for r in rows if r["strategy"] == "msfusion")
    ours["curve"] = [0.60, 0.60, 0.60, 0.60, 0.76]  # one lucky last round
    bench = _bench()
    assert bench.target_lines(rows)[0].endswith("TARGET MET")
    line = bench.target_lines(rows, "last5")[0]
    assert "msfusion 0.6320" in line and line.endswith("target missed")


def test_devices_and_data_reach_the_run(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(4), 100)  # every device gets at least one batch of 32
    pixels = np.random.default_rng(0).integers(0, 64, (400, 1, 8, 8)) + 60 * labels[:, None, None, None]
    np.savez(tmp_path / "tiny.npz", x=pixels.astype(np.uint8), y=labels)
    out = tmp_path / "tiny.json"
    argv = f"--out {out} --quick --data {tmp_path / 'tiny.npz'} --devices 3 --cases cnn --budgets 1/4".split()
    argv += "--strategies fedavg-full --rounds 1 --max-samples 32 --threads 1".split()
    bench = _bench()
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    [row] = result["results"]
    assert result["devices"] == 3 and row["devices"] == 3 and row["case"] == "tiny-cnn" and row["rounds"] == 1
    assert [c.name for c in bench.cases(quick=True)] == ["fmnist-cnn", "fmnist-resnet", "shakespeare-charlm"]
