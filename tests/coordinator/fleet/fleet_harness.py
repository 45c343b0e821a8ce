"""Helpers for the fleet end-to-end tests: shards, device processes, an in-thread coordinator, the reference run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from msfusion.algorithm.slicing import Weights
from msfusion.coordinator.fleet.config import (
    CoordinatorConfig,
    FleetConfig,
    RoundConfig,
)
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    ShardSet,
    device_id,
    load_shard_set,
    partition_data,
    start_device,
    stop_processes,
    write_device_configs,
)
from msfusion.coordinator.fleet.registry import ratio_for_memory
from msfusion.coordinator.fleet.report import RunSummary, read_metrics
from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.coordinator.reference.engine import ReferenceEngine
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec
from msfusion.recipe import EngineConfig, LocalTrainConfig
from msfusion.wire import topics
from msfusion.wire.transport import MqttTransport, Received

MODEL = ModelConfig(arch="cnn", channels=(8, 16, 32))
ENGINE = EngineConfig(
    model=MODEL,
    local=LocalTrainConfig(epochs=1, batch_size=32, lr=0.05, max_samples=128),
    loss=LossConfig(variant=ContrastiveVariant.MOON, mu=0.1, tau=0.5),
    rounds=3,
    seed=7,
)
BUDGET_BYTES = 512 << 20
MAX_RATIO = 0.5
N_DEVICES = 4


def make_shards(root: Path) -> ShardSet:
    """Four small IID Fashion-MNIST shards and a 500-sample test set."""
    return partition_data(
        PartitionConfig(
            devices=N_DEVICES, scheme="iid", seed=3, samples_per_device=256, test_samples=500, validation_samples=300
        ),
        root,
    )


@dataclass
class Fleet:
    """Device processes of one test, with their configs and logs."""

    out: Path
    shards: ShardSet
    run_id: str
    broker_url: str
    configs: list[Path] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.configs = write_device_configs(
            self.out, self.shards, self.run_id, self.broker_url, "ort", BUDGET_BYTES, MAX_RATIO, heartbeat_s=1.0
        )

    def log_path(self, index: int) -> Path:
        return self.out / "logs" / f"{device_id(index)}.log"

    def start(self, index: int) -> None:
        self.processes[device_id(index)] = start_device(self.configs[index], self.log_path(index))

    def start_all(self) -> None:
        for index in range(len(self.configs)):
            self.start(index)

    def kill(self, index: int) -> None:
        proc = self.processes[device_id(index)]
        proc.kill()
        proc.wait()

    def log(self, index: int) -> str:
        path = self.log_path(index)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, index: int, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log(index):
            if time.monotonic() > deadline:
                raise AssertionError(f"{device_id(index)} never logged {text!r}:\n{self.log(index)[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> list[int | None]:
        codes: list[int | None] = stop_processes(list(self.processes.values()), timeout_s=10)
        return codes


def coordinator_config(
    out: Path, run_id: str, broker_url: str, shards: ShardSet, **round_knobs: Any
) -> CoordinatorConfig:
    return CoordinatorConfig(
        engine=ENGINE,
        run_id=run_id,
        broker=broker_url,
        out=out,
        eval_shard=shards.test,
        backend="ort",
        round=RoundConfig(**{"deadline_s": 60.0, "quorum": 0.5, "stall_s": 2.0, **round_knobs}),
        fleet=FleetConfig(min_devices=N_DEVICES, wait_s=90.0, heartbeat_timeout_s=10.0),
    )


class CoordinatorThread(threading.Thread):
    """`run_coordinator` in a thread, so a test can inject faults meanwhile."""

    def __init__(self, config: CoordinatorConfig, artifacts: Any) -> None:
        super().__init__(daemon=True)
        self.config = config
        self.artifacts = artifacts
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.summary = run_coordinator(self.config, self.artifacts)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout_s: float = 180.0) -> RunSummary:
        self.join(timeout_s)
        if self.is_alive():
            raise AssertionError("the coordinator did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def merged_rounds(out: Path) -> list[dict[str, Any]]:
    return [line for line in read_metrics(out) if line["merged"]]


def reference_engine(shards: ShardSet, rounds: int = ENGINE.rounds) -> ReferenceEngine:
    """The in-process reference engine on the same shards, seeds and device ratios, after its run."""
    data = load_shard_set(shards, MODEL)
    ratio = ratio_for_memory(model_spec(MODEL), BUDGET_BYTES, MAX_RATIO)
    from dataclasses import replace

    engine = ReferenceEngine(replace(ENGINE, rounds=rounds), data.devices, data.test, [ratio] * N_DEVICES)
    engine.run()
    return engine


def reference_weights(shards: ShardSet, rounds: int = ENGINE.rounds) -> tuple[Weights, list[float]]:
    """The reference engine's final global weights and its test accuracy per round."""
    engine = reference_engine(shards, rounds)
    return engine.weights, [r.metrics["accuracy"] for r in engine.history]


def max_abs_diff(a: Weights, b: Weights) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in a)


def python() -> str:
    return sys.executable


def retained(broker: Any, run_id: str, wait_s: float = 1.0) -> dict[str, bytes]:
    """What a new subscriber to the whole run gets at once: the broker's retained messages of the run."""
    probe = MqttTransport(f"probe-{run_id}-{time.monotonic_ns()}", broker.host, broker.port)
    probe.connect()
    try:
        probe.subscribe(f"{topics.run_prefix(run_id)}/#")
        found: dict[str, bytes] = {}
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            event = probe.get(left)
            if isinstance(event, Received) and event.retained:
                found[event.topic] = event.payload
        return found
    finally:
        probe.close()
