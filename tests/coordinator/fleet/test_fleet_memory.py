"""Devices under real memory limits (cgroup v1, else RLIMIT_AS): profiled sizing, the memory guard, recovery.

One run, three device processes each in its own memory cap, over a real
Mosquitto, three rounds of a CNN whose activations are a real share of the
peak (channels 32/64/128, batch 64):

- dev000 and dev001 registered with a profile measured on this machine by
  `msfusion-device profile` (run once and copied: the devices are the same
  machine, so the same measurements hold), with budgets chosen from it so
  that dev000 affords the full width and dev001 less than half;
- dev002 has no profile. The budget rule counts parameters only, so it gets
  the full width, whose real peak is over its budget (but under its hard
  cap, as systemd's MemoryMax sits above the runtime's budget): its guard
  stops the task, it answers memory_budget, and trains at half width from
  the next round on.

Every budget and cap is derived from the measured profile, so the test holds
wherever the runtime's baseline (e.g. whether onnxruntime loads torch) differs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from fleet_harness import CoordinatorThread
from memory_limits import MemoryCap, memory_cap, remove_stale_cgroups, start_capped

from msfusion.coordinator.fleet.artifacts import ExportedArtifacts, export_profile_set
from msfusion.coordinator.fleet.config import (
    CoordinatorConfig,
    FleetConfig,
    RoundConfig,
)
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    partition_data,
    stop_processes,
)
from msfusion.coordinator.fleet.memory_model import (
    fit_memory_model,
    samples_from_profile,
)
from msfusion.coordinator.fleet.registry import (
    RUNTIME_BYTES,
    ratio_for_memory,
    ratio_from_profile,
)
from msfusion.coordinator.fleet.report import RunSummary, read_metrics
from msfusion.coordinator.fleet.runner import run_sizing
from msfusion.coordinator.fleet.sizing import model_sizes
from msfusion.edge_runtime.config import DeviceConfig, to_toml
from msfusion.edge_runtime.profiling import PROFILE_FILE, load_profile
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec
from msfusion.recipe import EngineConfig, LocalTrainConfig
from msfusion.wire.protocol import ProfileReport

pytestmark = [pytest.mark.e2e]

MIB = 1 << 20
MODEL = ModelConfig(arch="cnn", channels=(32, 64, 128))
ENGINE = EngineConfig(
    model=MODEL,
    local=LocalTrainConfig(epochs=1, batch_size=128, lr=0.05, max_samples=256),
    loss=LossConfig(variant=ContrastiveVariant.MOON, mu=0.1, tau=0.5),
    rounds=3,
    seed=11,
)
WIDTHS = (1.0, 0.5, 0.25, 0.125)
DEVICES = ("dev000", "dev001", "dev002")
UNIT_HEADROOM = 0.85  # budget = 0.85 x hard cap, as a board profile's budget sits under the unit's MemoryMax


@dataclass
class CappedRun:
    """What the run left behind for the tests to check."""

    out: Path
    summary: RunSummary
    lines: list[dict[str, Any]]
    profile: ProfileReport
    budgets: dict[str, int]
    caps: dict[str, MemoryCap]
    oom_kills: dict[str, int]
    exit_codes: dict[str, int | None]
    alive_before_stop: dict[str, bool]
    logs: dict[str, str] = field(default_factory=dict)


def _budgets(profile: ProfileReport) -> tuple[dict[str, int], dict[str, int]]:
    """Per device its budget and hard cap, from the measured peaks (by width)."""
    peak = {e.width_ratio: e.peak_rss_bytes for e in profile.entries}
    margin = FleetConfig().memory_margin
    budgets = {
        # the full width with the coordinator's margin to spare, and a little more
        "dev000": int(peak[1.0] / (1 - margin) * 1.03),
        # between a quarter and a half width
        "dev001": int((peak[0.5] + peak[0.25]) / 2 / (1 - margin)),
        # the full width does not fit; half the width does, with half the gap to spare
        "dev002": int((peak[1.0] + peak[0.5]) / 2),
    }
    caps = {d: int(b / UNIT_HEADROOM) for d, b in budgets.items()}
    # dev002's hard cap must hold the one step the guard lets run past its budget.
    caps["dev002"] = max(caps["dev002"], peak[1.0] + 128 * MIB)
    return budgets, caps


@pytest.fixture(scope="module")
def capped_run(mosquitto: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedRun]:
    remove_stale_cgroups()
    out = tmp_path_factory.mktemp("capped")
    cache = out / "artifact-cache"
    shards = partition_data(
        PartitionConfig(devices=len(DEVICES), scheme="iid", seed=5, samples_per_device=256, test_samples=500),
        out / "shards",
    )
    run_id = "capped"

    # The profile set, and one device's profile through the real command.
    export_profile_set(ENGINE, "ort", WIDTHS, [ENGINE.local.batch_size], out / "profile-set", cache_dir=cache)
    configs: dict[str, Path] = {}

    def write_config(device_id: str, index: int, budget: int) -> Path:
        folder = out / "devices" / device_id
        folder.mkdir(parents=True, exist_ok=True)
        config = DeviceConfig(
            device_id=device_id,
            run_id=run_id,
            data_dir=shards.devices[index],
            state_dir=folder / "state",
            memory_budget_bytes=budget,
            broker=mosquitto.url,
            backends=("ort",),
            heartbeat_s=1.0,
            keepalive_s=5,
        )
        path = folder / "device.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        return path

    probe = write_config("dev000", 0, 8 << 30)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msfusion.edge_runtime",
            "profile",
            "--config",
            str(probe),
            "--artifacts",
            str(out / "profile-set"),
            "--widths",
            ",".join(map(str, WIDTHS)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    profile = load_profile(out / "devices/dev000/state" / PROFILE_FILE)
    assert profile is not None and len(profile.entries) == len(WIDTHS), proc.stdout
    budgets, limits = _budgets(profile)
    assert budgets["dev002"] > RUNTIME_BYTES + 16 * MIB, (
        f"the runtime's baseline is far below service.RUNTIME_BYTES; dev002's budget {budgets['dev002']} "
        f"(peaks by width: { {e.width_ratio: e.peak_rss_bytes >> 20 for e in profile.entries} } MiB) "
        "would be refused by the budget rule: retune this test"
    )
    for index, device_id in enumerate(DEVICES):
        configs[device_id] = write_config(device_id, index, budgets[device_id])
    (out / "devices/dev001/state").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "devices/dev000/state" / PROFILE_FILE, out / "devices/dev001/state" / PROFILE_FILE)

    # The fleet, each device in its cap.
    caps = {d: memory_cap(d, limits[d]) for d in DEVICES}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    alive: dict[str, bool] = {}
    try:
        for device_id in DEVICES:
            argv = [sys.executable, "-m", "msfusion.edge_runtime", "--config", str(configs[device_id])]
            env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            processes[device_id] = start_capped(caps[device_id], argv, out / "logs" / f"{device_id}.log", env)
        config = CoordinatorConfig(
            engine=ENGINE,
            run_id=run_id,
            broker=mosquitto.url,
            out=out,
            eval_shard=shards.test,
            backend="ort",
            artifact_cache=cache,
            round=RoundConfig(deadline_s=90.0, quorum=0.5, stall_s=2.0),
            fleet=FleetConfig(min_devices=len(DEVICES), wait_s=120.0, heartbeat_timeout_s=15.0),
        )
        coordinator = CoordinatorThread(config, ExportedArtifacts(ENGINE, "ort", cache_dir=cache))
        coordinator.start()
        summary = coordinator.result(timeout_s=400)
        time.sleep(0.5)
        alive = {d: p.poll() is None or p.returncode == 0 for d, p in processes.items()}
    finally:
        codes = stop_processes(list(processes.values()), timeout_s=15)
        oom = {d: cap.oom_kills() for d, cap in caps.items()}
        for cap in caps.values():
            cap.close()
    logs = {d: (out / "logs" / f"{d}.log").read_text(errors="replace") for d in DEVICES}
    yield CappedRun(
        out=out,
        summary=summary,
        lines=read_metrics(out),
        profile=profile,
        budgets=budgets,
        caps=caps,
        oom_kills=oom,
        exit_codes=dict(zip(processes, codes)),
        alive_before_stop=alive,
        logs=logs,
    )


def test_a_capped_fleet_trains_to_completion_without_an_oom_kill(capped_run: CappedRun) -> None:
    run = capped_run
    assert run.summary.ok, (run.summary.reason, _story(run))
    assert run.summary.rounds == ENGINE.rounds, _story(run)
    assert run.oom_kills == {d: 0 for d in DEVICES}, run.oom_kills
    assert run.exit_codes == {d: 0 for d in DEVICES}, (run.exit_codes, {d: log[-2000:] for d, log in run.logs.items()})
    for line in run.lines:
        for device_id, peak in line["peak_rss_bytes"].items():
            # Below its budget, which is below its hard cap.
            assert peak <= run.budgets[device_id] < run.caps[device_id].limit_bytes, (device_id, peak >> 20)


def test_profiled_devices_get_the_widest_width_their_profile_says_fits(capped_run: CappedRun) -> None:
    run = capped_run
    sizing = run_sizing(CoordinatorConfig(engine=ENGINE, backend="ort"))
    first = run.lines[0]
    model = fit_memory_model(samples_from_profile(run.profile.entries), model_sizes(MODEL))
    for device_id in ("dev000", "dev001"):
        expected, _ = ratio_from_profile(run.profile, run.budgets[device_id], sizing)
        assert first["width_ratios"][device_id] == expected
        assert first["replies"][device_id] == "merged"
        # What it measured training in the fleet is what its profile predicted (the benchmark's 10%).
        predicted = model.predict(expected, ENGINE.local.batch_size)
        measured = first["peak_rss_bytes"][device_id]
        assert abs(measured - predicted) / measured < 0.10, (device_id, measured >> 20, predicted / MIB)
    assert first["width_ratios"]["dev000"] == 1.0
    assert 0.25 < first["width_ratios"]["dev001"] < 0.5


def _story(run: CappedRun) -> str:
    """What happened, for assertion messages."""
    rows = [
        f"r{line['round_idx']}a{line['attempt']} merged={line['merged']} ratios={line['width_ratios']} replies={line['replies']} "
        f"peaks={ {d: p >> 20 for d, p in line['peak_rss_bytes'].items()} }"
        for line in run.lines
    ]
    budgets = {d: b >> 20 for d, b in run.budgets.items()}
    return "\n".join([f"budgets MiB {budgets}", *rows, "dev002 log tail:", run.logs["dev002"][-3000:]])


def test_a_device_given_too_wide_a_width_fails_cleanly_and_recovers_narrower(capped_run: CappedRun) -> None:
    run = capped_run
    story = _story(run)
    spec = model_spec(MODEL)
    given = ratio_for_memory(spec, run.budgets["dev002"])
    assert given == 1.0, story  # the budget rule (parameters only) gives it the full width
    assert [line["round_idx"] for line in run.lines] == [0, 1, 2], story
    first, later = run.lines[0], run.lines[1:]
    # Round 0: the guard stopped the task; the round still merged the other two.
    assert first["width_ratios"]["dev002"] == given, story
    assert first["replies"]["dev002"].startswith("failed: memory_budget: stopped after step 1 of 2"), story
    assert first["merged"] and [d for d, r in first["replies"].items() if r == "merged"] == ["dev000", "dev001"], story
    # The daemon stayed up, handed its memory back, and trained at half the width from round 1 on.
    assert run.alive_before_stop["dev002"], story
    assert "memory after the stopped task" in run.logs["dev002"], story
    for line in later:
        assert line["width_ratios"]["dev002"] == given / 2, story
        assert line["replies"]["dev002"] == "merged", story
        assert line["peak_rss_bytes"]["dev002"] <= run.budgets["dev002"], story
