"""End to end: 4 device processes x 3 rounds over a real Mosquitto equal the in-process reference engine.

Tolerance: the devices train with ONNX Runtime, whose kernels (convolution,
reductions, the fused SGD update) round differently from torch's; after 3
rounds of 4 local steps the global weights differ by at most 5e-7 (measured).
We allow atol 1e-3: far above that float noise, far below what a wrong plan,
batch order, seed, re-sliced negative or merge would change (those move
weights by 1e-2 or more).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fleet_harness import N_DEVICES, Fleet, coordinator_config, max_abs_diff, reference_engine, retained

from msfusion.algorithm.inference import choose_deployable
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.wire.weights import unpack_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATOL = 1e-3
DEVICES = [f"dev{i:03d}" for i in range(N_DEVICES)]


def test_four_devices_three_rounds_equal_the_reference_engine(
    mosquitto: Any, fleet_shards: Any, fleet_reference: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    shards, reference, artifacts = fleet_shards, fleet_reference, fleet_artifacts
    # Prepare
    fleet = Fleet(tmp_path, shards, "e2e", mosquitto.url)
    fleet.start_all()
    # Execute
    try:
        config = replace(coordinator_config(tmp_path, "e2e", mosquitto.url, shards), validation_shard=shards.validation)
        summary = run_coordinator(config, artifacts)
    finally:
        codes = fleet.stop()
    # Assert: every round merged all four slices, once.
    lines = read_metrics(tmp_path)
    assert summary.ok, summary.reason
    assert [line["round_idx"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert line["replies"] == {d: "merged" for d in DEVICES}, line["replies"]
    accuracy = [line["metrics"]["accuracy"] for line in lines]
    assert accuracy[-1] > accuracy[0], accuracy
    # The fleet's merged model is the reference engine's, within float noise.
    merged_file = tmp_path / ("model-merged.safetensors" if summary.deployable != "merged" else "model.safetensors")
    final = unpack_weights(merged_file.read_bytes())
    expected, expected_accuracy = reference
    assert max_abs_diff(final, expected) < ATOL
    assert accuracy == pytest.approx(expected_accuracy, abs=0.01)
    # model.safetensors is the variant chosen on the validation shard, and equals the engine's same variant.
    checked = {name: figures["validation"] for name, figures in summary.variant_metrics.items()}
    assert set(checked) == {"merged", "expected"} and summary.deployable == choose_deployable(checked)
    engine = reference_engine(shards)
    variants = {"merged": engine.weights, "expected": engine.cohold.expected_weights(engine.weights)}
    deployed = unpack_weights((tmp_path / "model.safetensors").read_bytes())
    assert max_abs_diff(deployed, variants[summary.deployable]) < ATOL
    assert max_abs_diff(variants["expected"], variants["merged"]) > 10 * ATOL  # the variants really differ
    # The devices stopped when told, cleanly; the outputs exist.
    assert codes == [0] * N_DEVICES
    for name in ("summary.json", "metrics.jsonl", "model.safetensors", "accuracy.png"):
        assert (tmp_path / name).exists(), name
    assert all(summary.devices[d]["bytes_down"] > 0 and summary.devices[d]["bytes_up"] > 0 for d in DEVICES)
    # Nothing of the run stays retained on the broker (registrations, statuses).
    assert retained(mosquitto, "e2e") == {}
