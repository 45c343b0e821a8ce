"""`msfusion simulate --engine ray`: simulated devices as Ray actors on a real two-node Ray cluster.

The cluster is started with the `ray` CLI, as on real machines: a head node and a worker node on this
machine, told apart by custom resources (`head_node`, `worker_node`), each with Ray's `memory` resource
sized for exactly its share of devices. Device i asks for `head_node` when i is even, `worker_node` when
odd, so half the actors run on each node.

The 32-actor run is compared with the in-process reference engine, not with a 32-process run of the
process simulator (32 more daemon processes would double the test's time on two cores): the process
simulator is tested to reproduce the reference engine (test_fleet.py, same tolerance), so equal to the
engine is equal to it. Tolerance: atol 1e-3, as there (ONNX Runtime against torch is float noise, 5e-7).

Ray is a coordinator dependency (scripts/setup.sh installs it): without it these tests fail, not skip.
Teardown kills the cluster's processes by pid (each one that names this cluster's temp folder, and their
children) rather than `ray stop --force`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from fleet_harness import BUDGET_BYTES, ENGINE, MAX_RATIO, MODEL, max_abs_diff

from msfusion.coordinator.fleet.config import RoundConfig
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    SimulationConfig,
    load_shard_set,
    partition_data,
    simulate,
)
from msfusion.coordinator.fleet.ray_fleet import PLACEMENT_FILE, RayOptions
from msfusion.coordinator.fleet.registry import ratio_for_memory
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.coordinator.reference.engine import ReferenceEngine
from msfusion.models.registry import model_spec
from msfusion.wire.weights import unpack_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATOL = 1e-3
DEVICES = 32
PER_NODE = DEVICES // 2
NODES = ({"head_node": 1.0}, {"worker_node": 1.0})
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRayCluster:
    """A head and a worker node started with `ray start` on this machine, in a temp folder of their own."""

    def __init__(self) -> None:
        # Short and under /tmp: Ray's unix sockets live in it (a socket path has at most 107 bytes).
        self.temp = Path(tempfile.mkdtemp(prefix="msf-ray-", dir="/tmp"))
        self.port = _free_port()
        self.worker_manager_port = _free_port()

    @staticmethod
    def auth_env() -> dict[str, str]:
        """No token authentication, said explicitly to the nodes and this driver, whatever ~/.ray holds.

        Ray 2.60's `ray start --head` turns token auth on by itself when ~/.ray/auth_token exists (a local
        `ray.init()` writes one) and its worker nodes do not, and this process read its auth mode when it
        imported ray. The cluster is this test's own, on 127.0.0.1, for a minute.
        """
        return {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray_start(self, *flags: str) -> None:
        common = ["--num-cpus", "1", "--memory", str(PER_NODE * BUDGET_BYTES), "--object-store-memory", str(100 << 20)]
        common += ["--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp), "--disable-usage-stats"]
        env = {**os.environ, **self.auth_env()}
        done = subprocess.run([RAY, "start", *flags, *common], env=env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise AssertionError(f"ray start {' '.join(flags)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")

    def start_head(self) -> None:
        self._ray_start(
            "--head", "--port", str(self.port), "--resources", '{"head_node": 100}', "--include-dashboard", "false"
        )

    def start_worker(self) -> None:
        self._ray_start(
            "--address",
            self.address,
            "--resources",
            '{"worker_node": 100}',
            "--node-manager-port",
            str(self.worker_manager_port),
        )

    def worker_raylet(self) -> psutil.Process | None:
        flag = f"--node_manager_port={self.worker_manager_port}"
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if proc.info["name"] == "raylet" and flag in cmdline and any(str(self.temp) in a for a in cmdline):
                return proc
        return None

    def worker_alive(self) -> bool:
        return self.worker_raylet() is not None

    def kill_worker(self, raylet: psutil.Process) -> list[int]:
        """SIGKILL the worker node: its raylet and everything it started (agents, the device actors)."""
        procs = [raylet, *raylet.children(recursive=True)]
        _kill(procs)
        return [p.pid for p in procs]

    def stop(self) -> None:
        """Kill every process of this cluster (by pid: those naming its temp folder, and their children)."""
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp) in arg for arg in proc.info["cmdline"] or []):
                    roots.append(proc)
            except psutil.Error:
                continue
        procs: dict[int, psutil.Process] = {}
        for root in roots:
            try:
                procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.Error:
                continue
        _kill(list(procs.values()))
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster()
    with pytest.MonkeyPatch.context() as env:  # this process is the driver: it authenticates too
        for name, value in cluster.auth_env().items():
            env.setenv(name, value)
        try:
            cluster.start_head()
            cluster.start_worker()
            yield cluster
        finally:
            cluster.stop()


def ray_simulation(cluster: LocalRayCluster, out: Path, shards: Any, **knobs: Any) -> SimulationConfig:
    return SimulationConfig(
        engine=knobs.pop("engine", replace(ENGINE, rounds=2)),
        shards=shards,
        out=out,
        backend="ort",
        memory_budget_bytes=BUDGET_BYTES,
        max_width_ratio=MAX_RATIO,
        round=knobs.pop("round", RoundConfig(deadline_s=240.0, quorum=0.5, stall_s=2.0)),
        launcher="ray",
        ray=RayOptions(address=cluster.address, resources=NODES, start_timeout_s=300.0),
        **knobs,
    )


def placement(out: Path) -> dict[str, str]:
    """Device id -> the Ray node id its actor ran on."""
    table = json.loads((out / "logs" / PLACEMENT_FILE).read_text())
    return {device: entry["node"] for device, entry in table.items()}


def test_32_ray_actors_on_two_nodes_reproduce_the_reference_engine(
    ray_cluster: LocalRayCluster, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: 32 IID shards of one batch each; the actors alternate between the two nodes.
    if not ray_cluster.worker_alive():  # a test before this one killed it
        ray_cluster.start_worker()
    shards = partition_data(
        PartitionConfig(devices=DEVICES, scheme="iid", seed=3, samples_per_device=32, test_samples=200),
        tmp_path / "shards",
    )
    config = ray_simulation(ray_cluster, tmp_path / "run", shards)
    # Execute
    summary = simulate(config, fleet_artifacts)
    # Assert: both rounds merged every device's slice; 16 devices ran on each node.
    assert summary.ok, summary.reason
    lines = read_metrics(config.out)
    assert [line["round_idx"] for line in lines] == [0, 1]
    for line in lines:
        assert set(line["replies"].values()) == {"merged"} and len(line["replies"]) == DEVICES, line["replies"]
    nodes = placement(config.out)
    even = {nodes[f"dev{i:03d}"] for i in range(0, DEVICES, 2)}
    odd = {nodes[f"dev{i:03d}"] for i in range(1, DEVICES, 2)}
    assert len(even) == 1 and len(odd) == 1 and even != odd, nodes
    # The global model is the reference engine's on the same shards, seeds and widths.
    data = load_shard_set(shards, MODEL)
    ratio = ratio_for_memory(model_spec(MODEL), BUDGET_BYTES, MAX_RATIO)
    engine = ReferenceEngine(config.engine, data.devices, data.test, [ratio] * DEVICES)
    engine.run()
    merged = config.out / "model-merged.safetensors"
    final = unpack_weights((merged if merged.exists() else config.out / "model.safetensors").read_bytes())
    assert max_abs_diff(final, engine.weights) < ATOL
    accuracy = [line["metrics"]["accuracy"] for line in lines]
    assert accuracy == pytest.approx([r.metrics["accuracy"] for r in engine.history], abs=0.01)


def test_a_killed_worker_node_loses_its_devices_at_the_deadline_and_the_run_goes_on(
    ray_cluster: LocalRayCluster, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: four devices, two on each node; two live devices suffice for a round, so the first round
    # may start before the last daemon registered: the kill waits for a round holding all four (both
    # worker devices, and the head node's two, whose slices must make the round's quorum).
    if not ray_cluster.worker_alive():
        ray_cluster.start_worker()
    shards = partition_data(
        PartitionConfig(devices=4, scheme="iid", seed=3, samples_per_device=64, test_samples=200), tmp_path / "shards"
    )
    deadline_s = 10.0
    config = ray_simulation(
        ray_cluster,
        tmp_path / "run",
        shards,
        engine=replace(ENGINE, rounds=3),
        round=RoundConfig(deadline_s=deadline_s, quorum=0.5, stall_s=2.0),
        min_devices=2,
    )
    logs = config.out / "logs"
    killed: list[int] = []
    killed_in: list[int] = []

    raylet = ray_cluster.worker_raylet()  # found now: the kill must land before a device can reply
    assert raylet is not None

    def kill_when_every_device_trains() -> None:  # dev001 and dev003 run on the worker node
        paths = [logs / f"dev{i:03d}.log" for i in range(4)]
        give_up = time.monotonic() + 400
        while time.monotonic() < give_up:
            texts = [p.read_text(errors="replace") if p.exists() else "" for p in paths]
            for round_idx in range(config.engine.rounds - 1):  # not the last: the run must go on after it
                if all(f"round {round_idx}: task" in text for text in texts):
                    killed.extend(ray_cluster.kill_worker(raylet))
                    killed_in.append(round_idx)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_when_every_device_trains, daemon=True)
    killer.start()
    # Execute
    summary = simulate(config, fleet_artifacts)
    killer.join(5)
    # Assert: the worker node died mid-round; the round closed at its deadline with the head node's
    # slices, the lost devices recorded as "no reply"; the next rounds ran on the two that are left.
    assert killed, "the worker node was never killed"
    assert summary.ok, summary.reason
    lines = read_metrics(config.out)
    assert [(line["round_idx"], line["merged"]) for line in lines] == [(0, True), (1, True), (2, True)]
    hit = lines[killed_in[0]]
    assert {hit["replies"]["dev000"], hit["replies"]["dev002"]} == {"merged"}
    # A worker device whose slice was out before the kill landed is merged (a race the poll cannot
    # close: its one batch trains in milliseconds); the kill still cut the round short of one.
    lost = sorted(d for d in ("dev001", "dev003") if hit["replies"][d] == "no reply")
    assert lost and {hit["replies"][d] for d in ("dev001", "dev003")} <= {"merged", "no reply"}, hit["replies"]
    assert hit["timings_s"]["collect_s"] >= deadline_s - 0.5
    for line in lines[killed_in[0] + 1 :]:
        assert line["replies"] == {"dev000": "merged", "dev002": "merged"}
    assert all(any(d in f and "no reply" in f for f in summary.failures) for d in lost)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in killed)
