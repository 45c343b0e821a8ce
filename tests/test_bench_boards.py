"""bench/boards.py: the committed board table follows from the committed on-device runs, and says what it lacks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from msfusion.devices.profiles import BUILTIN_PROFILES

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_boards", ROOT / "bench" / "boards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_committed_table_is_what_its_inputs_give() -> None:
    # Prepare: the committed table and the runs it names (a later run added to bench/results does not count)
    committed = json.loads((ROOT / "bench" / "results" / "boards.json").read_text())
    inputs = [ROOT / p for p in committed["meta"]["inputs"]]
    # Execute
    result = _bench().build(inputs, committed["meta"]["safety_margin"])
    # Assert: the same figures, every board x model
    assert result["rows"] == committed["rows"] and result["fits"] == committed["fits"]
    models = {(f["model"], f["size"]) for f in result["fits"]}
    assert {(r["profile"], r["model"], r["size"]) for r in result["rows"]} == {
        (p, m, s) for p in BUILTIN_PROFILES for m, s in models
    }
    for row in result["rows"]:
        arch = BUILTIN_PROFILES[row["profile"]].arch
        assert (row["ort"]["fit"] == "not offered") == (arch == "aarch64")
        for backend in ("ort", "executorch", "torch"):
            cell = row[backend]
            if cell["fit"] == "fits":  # never above what the budget less the margin allows
                budget = committed["meta"]["budgets_mib"][row["profile"]]
                assert cell["predicted_peak_mib"] <= (1 - committed["meta"]["safety_margin"]) * budget


def test_a_model_measured_at_two_widths_borrows_a_fitted_overhead_and_hits_both_points() -> None:
    result = json.loads((ROOT / "bench" / "results" / "boards.json").read_text())
    (board,) = [f for f in result["fits"] if (f["backend"], f["model"], f["size"]) == ("ort", "charlm", "board")]
    (donor,) = [f for f in result["fits"] if (f["backend"], f["model"], f["size"]) == ("ort", "charlm", "large")]
    assert board["overhead_from"] == "charlm (large)" and board["overhead_mib"] == donor["overhead_mib"]
    assert sorted(s["width"] for s in board["samples"]) == [0.5, 1.0] and board["max_relative_error"] < 1e-3
    # and the rule, checked where a third width was measured, predicts it within 5%
    assert result["borrowed_overhead_checks"]
    assert all(abs(c["relative_error"]) < 0.05 for c in result["borrowed_overhead_checks"])
