"""A 1,000-device round: synthetic devices (the real daemon, protocol and chunking) against a real Mosquitto.

Figures (CPU, memory, messages/s at 100-5,000 devices) are bench/scale.py's; this test bounds nothing
in time beyond the round's deadline: it checks that a round over a thousand connections completes and
merges every slice, and that the merged model is what the synthetic updates make it.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fleet_harness import ENGINE, MODEL

from msfusion.coordinator.fleet.broker import FLEET_SETTINGS, MosquittoBroker, mosquitto_binary
from msfusion.coordinator.fleet.config import CoordinatorConfig, FleetConfig, RoundConfig
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    partition_data,
    start_synthetic_hosts,
    stop_processes,
)
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.models.registry import build_model, state_to_numpy
from msfusion.wire.weights import unpack_weights

DEVICES = 1000


@pytest.mark.slow
def test_a_thousand_synthetic_devices_complete_a_round_against_mosquitto(tmp_path: Path, fleet_artifacts) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the broker with the large-fleet settings, a thousand devices in four host processes
    binary = mosquitto_binary()
    assert binary is not None, "Mosquitto is part of the test set-up (scripts/setup.sh installs it)"
    shards = partition_data(
        PartitionConfig(devices=1, scheme="iid", samples_per_device=32, test_samples=100), tmp_path / "shards"
    )
    broker = MosquittoBroker(binary, tmp_path / "broker.log", settings=FLEET_SETTINGS)
    engine = replace(ENGINE, rounds=1)
    run_id = "synthetic-1k"
    hosts = start_synthetic_hosts(
        broker.url, run_id, Path(shards.device_data(0).path), tmp_path / "devices", DEVICES, tmp_path, per_host=250
    )
    config = CoordinatorConfig(
        engine=engine,
        run_id=run_id,
        broker=broker.url,
        out=tmp_path / "run",
        eval_shard=shards.test,
        round=RoundConfig(deadline_s=600, stall_s=30),
        fleet=FleetConfig(min_devices=DEVICES, wait_s=600, heartbeat_timeout_s=120),
    )
    # Execute
    try:
        summary = run_coordinator(config, fleet_artifacts)
    finally:
        codes = stop_processes(hosts, timeout_s=60)
        broker.stop()
        shutil.rmtree(tmp_path / "devices", ignore_errors=True)
    # Assert: one round with every device's slice merged, hosts told to stop and gone cleanly
    assert summary.ok
    (line,) = [line for line in read_metrics(config.out) if line["merged"]]
    assert len(line["replies"]) == DEVICES
    assert set(line["replies"].values()) == {"merged"}
    assert codes == [0] * len(hosts)
    # The synthetic update is noise of scale 1e-3 around the sent weights: the model moved, by about that much.
    start = state_to_numpy(build_model(MODEL, seed=ENGINE.seed))
    merged = unpack_weights((config.out / "model.safetensors").read_bytes())
    moved = max(float(np.abs(merged[n] - start[n]).max()) for n in start)
    assert 0 < moved < 0.01
    assert all(np.all(np.isfinite(v)) for v in merged.values())
