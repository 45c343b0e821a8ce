"""A simulated fleet on one machine: partition real data, start N device daemons as OS processes, train.

`simulate` writes into its output folder::

    shards/dev000 ... shards/test   the device shards and the held-out set
    devices/devNNN/device.toml      each daemon's config (state/ beside it)
    logs/devNNN.log, logs/broker.log
    metrics.jsonl, summary.json, model.safetensors, accuracy.png, checkpoint/

With no broker URL it starts a private one (Mosquitto if installed, else amqtt).
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from msfusion.coordinator.fleet.broker import start_private_broker
from msfusion.coordinator.fleet.config import (
    CoordinatorConfig,
    FleetConfig,
    RoundConfig,
)
from msfusion.coordinator.fleet.report import RunSummary
from msfusion.coordinator.fleet.rounds import ArtifactSource
from msfusion.coordinator.fleet.runner import RunProgress, run_coordinator
from msfusion.data.datasets import ArrayDataset
from msfusion.data.idx import FASHION_MNIST_DIR, load_fashion_mnist
from msfusion.data.partition import dirichlet, iid
from msfusion.data.shards import write_shard
from msfusion.edge_runtime.config import DeviceConfig, to_toml
from msfusion.errors import ConfigError
from msfusion.recipe import EngineConfig, device_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionConfig:
    """How a data set is shared out over devices.

    Attributes:
        devices: number of devices.
        scheme: "dirichlet" (label skew) or "iid".
        alpha: Dirichlet concentration (smaller: more skew).
        seed: partition seed.
        samples_per_device: cap on each shard (0: everything it was dealt).
        test_samples: held-out samples kept (0: the whole test set).
        validation_samples: training samples held out of every shard for choosing the deployable
            model (0: none; written as `validation/`).
        data_root: the Fashion-MNIST folder.
    """

    devices: int = 8
    scheme: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    samples_per_device: int = 0
    test_samples: int = 2000
    validation_samples: int = 0
    data_root: Path = Path(FASHION_MNIST_DIR)

    def __post_init__(self) -> None:
        if self.scheme not in ("dirichlet", "iid"):
            raise ConfigError(f"scheme must be 'dirichlet' or 'iid', got {self.scheme!r}")
        if self.devices < 1:
            raise ConfigError("devices must be >= 1")


@dataclass(frozen=True)
class ShardSet:
    """Where `partition_fmnist` wrote its shards (device folders in device order)."""

    devices: tuple[Path, ...]
    test: Path
    validation: Path | None = None


def partition_fmnist(config: PartitionConfig, out: Path) -> ShardSet:
    """Partition Fashion-MNIST's training set into device shards plus a test shard.

    Args:
        config: the partition knobs.
        out: the folder to write `dev000/`, ..., `test/` into.

    Returns:
        The shard folders.

    Raises:
        DataError: Fashion-MNIST is missing.
    """
    train, test = load_fashion_mnist(config.data_root)
    rng = np.random.default_rng(config.seed)
    validation = None
    if config.validation_samples:  # drawn before the partition, so no device ever trains on it
        order = np.random.default_rng([config.seed, 1]).permutation(len(train))
        held, kept = order[: config.validation_samples], np.sort(order[config.validation_samples :])
        validation = out / "validation"
        write_shard(validation, train.x[held], train.y[held], {"name": "fmnist-validation", "task": "classification"})
        train = train.subset(kept)
    if config.scheme == "iid":
        parts = iid(len(train), config.devices, rng)
    else:
        parts = dirichlet(train.y, config.devices, config.alpha, rng)
    folders = []
    for index, part in enumerate(parts):
        if config.samples_per_device:
            part = part[: config.samples_per_device]
        shard = train.subset(part)
        folder = out / device_id(index)
        write_shard(
            folder,
            shard.x,
            shard.y,
            {
                "name": f"fmnist-{device_id(index)}",
                "task": "classification",
                "scheme": config.scheme,
                "seed": config.seed,
            },
        )
        folders.append(folder)
    if config.test_samples:
        test = test.subset(np.arange(min(config.test_samples, len(test))))
    write_shard(out / "test", test.x, test.y, {"name": "fmnist-test", "task": "classification"})
    return ShardSet(tuple(folders), out / "test", validation)


def start_device(config_path: Path, log_path: Path, threads: int = 1) -> subprocess.Popen[bytes]:
    """Start one device daemon as an OS process, logging to `log_path`."""
    env = dict(os.environ)
    # One training thread per simulated device: N processes share this machine's cores.
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "msfusion.edge_runtime", "--config", str(config_path)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )


def write_device_configs(
    out: Path,
    shards: ShardSet,
    run_id: str,
    broker: str,
    backend: str,
    memory_budget_bytes: int,
    max_width_ratio: float | None,
    heartbeat_s: float = 2.0,
) -> list[Path]:
    """One device.toml per shard, in out/devices/devNNN/."""
    paths = []
    for index, shard in enumerate(shards.devices):
        folder = out / "devices" / device_id(index)
        folder.mkdir(parents=True, exist_ok=True)
        config = DeviceConfig(
            device_id=device_id(index),
            run_id=run_id,
            data_dir=shard.resolve(),
            state_dir=(folder / "state").resolve(),
            memory_budget_bytes=memory_budget_bytes,
            broker=broker,
            backends=(backend,),
            max_width_ratio=max_width_ratio,
            heartbeat_s=heartbeat_s,
            keepalive_s=5,
        )
        path = folder / "device.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        paths.append(path)
    return paths


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> list[int | None]:
    """Wait for processes to exit (they were told to stop), then terminate, then kill stragglers."""
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [proc.returncode for proc in processes]


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated run.

    Attributes:
        engine: the algorithm's knobs (model, plan, overlap, local, loss, rounds, seed).
        partition: how the data is shared out.
        out: the output folder.
        broker: an existing broker's URL, or None to start a private one.
        backend: the artifact kind devices train ("ort" or "executorch").
        memory_budget_bytes: every simulated device's memory budget.
        max_width_ratio: an optional width cap every device reports.
        round: per-round knobs.
    """

    engine: EngineConfig
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    out: Path = Path("runs/simulate")
    broker: str | None = None
    backend: str = "ort"
    memory_budget_bytes: int = 1 << 30
    max_width_ratio: float | None = None
    round: RoundConfig = field(default_factory=RoundConfig)


def simulate(config: SimulationConfig, artifacts: ArtifactSource, progress: RunProgress | None = None) -> RunSummary:
    """Partition, start a broker (unless given) and N daemons, run the coordinator, clean up.

    Returns:
        The run's summary (also in `config.out`/summary.json).
    """
    out = config.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    shards = partition_fmnist(config.partition, out / "shards")
    broker = None
    url = config.broker
    if url is None:
        broker = start_private_broker(out / "logs" / "broker.log")
        url = broker.url
    run_id = f"sim-{secrets.token_hex(3)}"  # fresh topics even on a shared broker
    paths = write_device_configs(
        out, shards, run_id, url, config.backend, config.memory_budget_bytes, config.max_width_ratio
    )
    processes = [start_device(path, out / "logs" / f"{device_id(i)}.log") for i, path in enumerate(paths)]
    coordinator = CoordinatorConfig(
        engine=config.engine,
        run_id=run_id,
        broker=url,
        out=out,
        eval_shard=shards.test,
        validation_shard=shards.validation,
        backend=config.backend,
        round=config.round,
        fleet=FleetConfig(min_devices=config.partition.devices, wait_s=120.0),
    )
    try:
        summary = run_coordinator(coordinator, artifacts, progress=progress)
    finally:
        codes = stop_processes(processes)
        log.info("device exit codes: %s", codes)
        if broker is not None:
            broker.stop()
    return summary


def load_shard_set(shards: ShardSet) -> tuple[list[ArrayDataset], ArrayDataset]:
    """Read a shard set back (for the reference engine)."""
    from msfusion.data.shards import read_shard

    devices = [ArrayDataset(*read_shard(p)[:2]) for p in shards.devices]
    return devices, ArrayDataset(*read_shard(shards.test)[:2])
