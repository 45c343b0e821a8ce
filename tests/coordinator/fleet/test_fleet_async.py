"""Asynchronous rounds over a real Mosquitto: a straggler's slice, late for its round, is merged into a later one.

The devices are synthetic (the real daemon, protocol and chunking; a slice of the sent weights plus
seeded noise after a fixed delay), so which round a late slice lands in depends only on the delays:
a straggler taking twice the round's deadline misses its round and is merged one to seven rounds
later with the staleness weight (1 + s)^-a of `[engine.merge]`. The arithmetic of that weight is
tests/msfusion/algorithm/test_merging.py's.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from fleet_harness import ENGINE

from msfusion.algorithm.merging import MergeConfig
from msfusion.coordinator.fleet.broker import MosquittoBroker, mosquitto_binary
from msfusion.coordinator.fleet.config import CoordinatorConfig, FleetConfig, RoundConfig
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    partition_data,
    start_synthetic_hosts,
    stop_processes,
)
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.coordinator.fleet.runner import run_coordinator

DEVICES = 4
SLOW = "dev003"
MERGE = MergeConfig(staleness_exponent=0.5, max_staleness=7)


def _run(tmp_path: Path, fleet_artifacts, asynchronous: bool) -> list[dict]:  # type: ignore[no-untyped-def]
    binary = mosquitto_binary()
    assert binary is not None, "Mosquitto is part of the test set-up (scripts/setup.sh installs it)"
    shards = partition_data(
        PartitionConfig(devices=1, scheme="iid", samples_per_device=32, test_samples=100), tmp_path / "shards"
    )
    broker = MosquittoBroker(binary, tmp_path / "broker.log")
    run_id = f"async-{int(asynchronous)}"
    hosts = start_synthetic_hosts(
        broker.url,
        run_id,
        Path(shards.device_data(0).path),
        tmp_path / "devices",
        DEVICES,
        tmp_path,
        extra=["--delay-s", "0.5", "--slow-ids", SLOW, "--slow-delay-s", "4"],
    )
    config = CoordinatorConfig(
        engine=replace(ENGINE, rounds=9, merge=MERGE),
        run_id=run_id,
        broker=broker.url,
        out=tmp_path / "run",
        eval_shard=shards.test,
        round=RoundConfig(deadline_s=2.0, asynchronous=asynchronous, quorum=0.5),
        fleet=FleetConfig(min_devices=DEVICES, wait_s=120),
    )
    try:
        summary = run_coordinator(config, fleet_artifacts)
    finally:
        stop_processes(hosts, timeout_s=30)
        broker.stop()
        shutil.rmtree(tmp_path / "devices", ignore_errors=True)
    assert summary.ok
    return [line for line in read_metrics(config.out) if line["merged"]]


@pytest.mark.slow
def test_a_stragglers_late_slice_is_merged_into_a_later_round_with_the_staleness_weight(
    tmp_path: Path,
    fleet_artifacts,  # type: ignore[no-untyped-def]
) -> None:
    # Execute: nine rounds, the straggler taking 4 s against a 2 s deadline (the others 0.5 s: rounds of
    # at least 0.5 s, so its slice is at most 7 rounds late)
    lines = _run(tmp_path, fleet_artifacts, asynchronous=True)
    # Assert: its round closes without it; it gets no task while its slice is out; the slice is merged later
    assert len(lines) == 9
    first = lines[0]
    assert first["replies"][SLOW] == "no reply"
    assert first["late"][SLOW].startswith("pending")
    merges = [
        (line["round_idx"], line["late"][SLOW]) for line in lines if line["late"].get(SLOW, "").startswith("merged")
    ]
    assert merges, [line["late"] for line in lines]
    for merged_in, note in merges:
        found = re.match(r"merged: its slice of round (\d+), (\d+) late, weight x([0-9.]+)", note)
        assert found, note
        trained_for, late, weight = int(found[1]), int(found[2]), float(found[3])
        assert late == merged_in - trained_for and 1 <= late <= MERGE.max_staleness
        assert weight == pytest.approx((1 + late) ** -0.5, rel=1e-2)
        for line in lines:  # between its task and its merge it was in no plan
            if trained_for < line["round_idx"] <= merged_in:
                assert SLOW not in line["devices"]
    # the fast devices' slices were merged in every round
    for line in lines:
        assert all(line["replies"][d] == "merged" for d in line["devices"] if d != SLOW)
