"""A simulated fleet on one machine: partition real data, start N device daemons as OS processes, train.

`simulate` writes into its output folder::

    shards/dev000 ... shards/test   the device shards and the held-out set
    devices/devNNN/device.toml      each daemon's config (state/ beside it)
    logs/devNNN.log, logs/broker.log
    metrics.jsonl, summary.json, model.safetensors, accuracy.png, checkpoint/

With no broker URL it starts a private one (Mosquitto if installed, else amqtt). With `launcher="ray"`
the daemons run as Ray actors instead of local processes (`ray_fleet.py`); the rest is the same.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from msfusion.coordinator.fleet.broker import Broker, SecureBroker, start_private_broker, start_secure_broker
from msfusion.coordinator.fleet.config import (
    CoordinatorConfig,
    FleetConfig,
    RoundConfig,
)
from msfusion.coordinator.fleet.events import RunEvents
from msfusion.coordinator.fleet.ray_fleet import RayDevices, RayOptions, connect, disconnect, load_configs
from msfusion.coordinator.fleet.report import RunSummary
from msfusion.coordinator.fleet.rounds import ArtifactSource
from msfusion.coordinator.fleet.runner import RunProgress, run_coordinator
from msfusion.data.datasets import ArrayDataset
from msfusion.data.idx import FASHION_MNIST_DIR
from msfusion.data.partition import dirichlet, iid, label_shards, natural
from msfusion.data.shards import write_shard
from msfusion.data.sources import (
    DataSpec,
    TextSource,
    check_report,
    combine_reports,
    detect_format,
    materialize,
    open_source,
    read_whole,
)
from msfusion.edge_runtime.config import DeviceConfig, to_toml
from msfusion.errors import ConfigError, DataError
from msfusion.models.config import ModelConfig
from msfusion.recipe import EngineConfig, device_id
from msfusion.wire.protocol import Preprocessing

log = logging.getLogger(__name__)


SCHEMES = ("dirichlet", "iid", "shards", "natural")


def parse_partition(text: str) -> tuple[str, float, int]:
    """`iid`, `dirichlet:ALPHA`, `shards:K` or `natural` as (scheme, alpha, shards per device).

    Raises:
        ConfigError: anything else.
    """
    scheme, _, arg = text.strip().partition(":")
    try:
        if scheme == "dirichlet":
            return scheme, float(arg) if arg else 0.5, 2
        if scheme == "shards":
            return scheme, 0.5, int(arg) if arg else 2
    except ValueError:
        pass
    else:
        if scheme in ("iid", "natural") and not arg:
            return scheme, 0.5, 2
    raise ConfigError(f"--partition must be iid, dirichlet:ALPHA, shards:K or natural, got {text!r}")


@dataclass(frozen=True)
class PartitionConfig:
    """How a data set is shared out over devices.

    Attributes:
        devices: number of devices.
        scheme: "dirichlet" (label skew), "iid", "shards" (each device gets `shards_per_device`
            label-sorted shards, the FedAvg paper's pathological split) or "natural" (text: whole
            files to devices; images: as iid).
        alpha: Dirichlet concentration (smaller: more skew).
        shards_per_device: label shards per device under "shards".
        seed: partition seed.
        samples_per_device: cap on each shard (0: everything it was dealt).
        test_samples: held-out samples kept (0: the whole test set).
        validation_samples: training samples held out of every shard for choosing the deployable
            model (0: none; written as `validation/`).
        data: the data set to partition (None: Fashion-MNIST from its Debian folder), any format
            `msfusion/data/sources.py` reads; a data set without a test split gives its last
            `TEST_SHARE` to the test set.
    """

    devices: int = 8
    scheme: str = "dirichlet"
    alpha: float = 0.5
    shards_per_device: int = 2
    seed: int = 0
    samples_per_device: int = 0
    test_samples: int = 2000
    validation_samples: int = 0
    data: DataSpec | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.devices < 1:
            raise ConfigError("devices must be >= 1")

    @property
    def source(self) -> DataSpec:
        return self.data if self.data is not None else DataSpec(Path(FASHION_MNIST_DIR), format="idx")


TEST_SHARE = 0.1  # of a data set without a test split (images: the last samples; text: each file's tail)


@dataclass(frozen=True)
class ShardSet:
    """Where a partition wrote its data (device folders in device order).

    Attributes:
        devices: each device's data: a shard folder, or a folder of text files (`format` "text").
        test: the held-out set.
        validation: the validation set (None: none).
        format: how devices read their folder ("shard" or "text").
        name: the data set's name (its folder or file stem).
    """

    devices: tuple[Path, ...]
    test: Path
    validation: Path | None = None
    format: str = "shard"
    name: str = "fmnist"

    def device_data(self, index: int) -> DataSpec:
        return DataSpec(self.devices[index].resolve(), format=self.format)


def data_name(spec: DataSpec) -> str:
    """A data set's short name: Fashion-MNIST's folder is "fmnist", others their folder or file stem."""
    if spec.path == Path(FASHION_MNIST_DIR):
        return "fmnist"
    return spec.path.stem if spec.path.is_file() else spec.path.name


def partition_data(config: PartitionConfig, out: Path) -> ShardSet:
    """Partition a data set's training part into device shards plus test (and validation) sets.

    Shards hold *raw* inputs (pixels in [0, 1]); the run's normalization is agreed
    from the devices' data reports, as on real boards. Text is dealt out as text
    files (whole files under "natural", contiguous pieces of each file otherwise).

    Args:
        config: the partition knobs.
        out: the folder to write `dev000/`, ..., `test/` into.

    Returns:
        The device folders and held-out sets.

    Raises:
        DataError: the data set is missing, unreadable or too small.
    """
    spec = config.source
    source = open_source(spec)
    if isinstance(source, TextSource):
        return _partition_text(config, source, out)
    train, _ = read_whole(spec)
    fmt = detect_format(spec.path) if spec.format == "auto" else spec.format
    if fmt in ("idx", "cifar10"):
        test, _ = read_whole(replace(spec, format=fmt, split="test"))
    else:
        order = np.random.default_rng([config.seed, 2]).permutation(len(train))
        cut = max(1, round(TEST_SHARE * len(train)))
        test, train = train.subset(np.sort(order[:cut])), train.subset(np.sort(order[cut:]))
    name = data_name(spec)
    rng = np.random.default_rng(config.seed)
    validation = None
    held_out = min(config.validation_samples, len(train) // 10)  # a small data set keeps most for training
    if held_out:  # drawn before the partition, so no device ever trains on it
        order = np.random.default_rng([config.seed, 1]).permutation(len(train))
        held, kept = order[:held_out], np.sort(order[held_out:])
        validation = out / "validation"
        write_shard(validation, train.x[held], train.y[held], {"name": f"{name}-validation", "task": "classification"})
        train = train.subset(kept)
    if config.scheme == "dirichlet":
        parts = dirichlet(train.y, config.devices, config.alpha, rng)
    elif config.scheme == "shards":
        parts = label_shards(train.y, config.devices, config.shards_per_device, rng)
    else:
        parts = iid(len(train), config.devices, rng)
    folders = []
    for index, part in enumerate(parts):
        if config.samples_per_device:
            part = part[: config.samples_per_device]
        shard = train.subset(part)
        folder = out / device_id(index)
        meta = {"name": f"{name}-{device_id(index)}", "task": "classification", "scheme": config.scheme}
        write_shard(folder, shard.x, shard.y, {**meta, "seed": config.seed})
        folders.append(folder)
    if config.test_samples:
        test = test.subset(np.arange(min(config.test_samples, len(test))))
    write_shard(out / "test", test.x, test.y, {"name": f"{name}-test", "task": "classification"})
    return ShardSet(tuple(folders), out / "test", validation, "shard", name)


def _partition_text(config: PartitionConfig, source: TextSource, out: Path) -> ShardSet:
    """Text to devices as text files; each file's last `TEST_SHARE` is the test text."""
    texts = source.texts()
    if not texts:
        raise DataError(f"{source.spec.path}: {source.report().fatal or 'no text'}")
    cut = [len(t) - max(1, round(TEST_SHARE * len(t))) for t in texts]
    train, test = [t[:c] for t, c in zip(texts, cut)], [t[c:] for t, c in zip(texts, cut)]
    rng = np.random.default_rng(config.seed)
    if config.scheme == "natural" and len(train) >= config.devices:
        ids = [f"{i:05d}" for i in range(len(train))]
        dealt = natural(ids, config.devices, rng, [len(t) for t in train])
        per_device = [[train[int(i)] for i in chosen] for chosen in dealt]
    else:  # contiguous pieces of every file, so every device holds running text
        per_device = [[] for _ in range(config.devices)]
        for text in train:
            bounds = np.linspace(0, len(text), config.devices + 1).astype(int)
            for d in range(config.devices):
                per_device[d].append(text[bounds[d] : bounds[d + 1]])
    folders = []
    for index, pieces in enumerate(per_device):
        folder = out / device_id(index)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.txt"):
            old.unlink()
        for k, piece in enumerate(pieces):
            (folder / f"part{k:04d}.txt").write_text(piece, encoding="utf-8")
        folders.append(folder)
    (out / "test").mkdir(parents=True, exist_ok=True)
    (out / "test" / "test.txt").write_text("\n".join(test), encoding="utf-8")
    return ShardSet(tuple(folders), out / "test" / "test.txt", None, "text", data_name(source.spec))


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


def start_synthetic_hosts(
    broker: str,
    run_id: str,
    data: Path,
    state: Path,
    devices: int,
    logs: Path,
    per_host: int = 300,
    heartbeat_s: float = 5.0,
    extra: Sequence[str] = (),
) -> list[subprocess.Popen[bytes]]:
    """Start `devices` synthetic devices (edge_runtime/synthetic.py) in host processes of at most `per_host` each.

    Ids are `msfusion simulate`'s (dev000, dev001, ...); every device registers `data`'s report;
    host k logs to `logs`/hostNNNNN.log (NNNNN its first device's index). `extra`: more flags for
    every host (e.g. `--slow-ids dev000,dev001 --slow-delay-s 5`).
    """
    logs.mkdir(parents=True, exist_ok=True)
    hosts = []
    for first in range(0, devices, per_host):
        count = min(per_host, devices - first)
        with open(logs / f"host{first:05d}.log", "ab") as handle:
            hosts.append(
                subprocess.Popen(
                    [sys.executable, "-m", "msfusion.edge_runtime.synthetic", "--broker", broker, "--run-id", run_id]
                    + [
                        "--data",
                        str(data),
                        "--state",
                        str(state),
                        "--ids",
                        ",".join(map(device_id, range(first, first + count))),
                    ]
                    + ["--heartbeat-s", str(heartbeat_s), *extra],
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            )
    return hosts


def write_device_configs(
    out: Path,
    shards: ShardSet,
    run_id: str,
    broker: str,
    backend: str,
    memory_budget_bytes: int,
    max_width_ratio: float | None,
    heartbeat_s: float = 2.0,
    secure: SecureBroker | None = None,
    straggle_s: Mapping[str, float] | None = None,
) -> list[Path]:
    """One device.toml per shard, in out/devices/devNNN/ (with `secure`: its TLS identity and keys).

    `straggle_s`: device id -> seconds it waits before each reply (a simulated straggler).
    """
    paths = []
    for index in range(len(shards.devices)):
        folder = out / "devices" / device_id(index)
        folder.mkdir(parents=True, exist_ok=True)
        data = shards.device_data(index)
        config = DeviceConfig(
            device_id=device_id(index),
            run_id=run_id,
            data_dir=data.path if data.format == "shard" else None,
            data=None if data.format == "shard" else data,
            state_dir=(folder / "state").resolve(),
            memory_budget_bytes=memory_budget_bytes,
            broker=broker,
            backends=(backend,),
            max_width_ratio=max_width_ratio,
            heartbeat_s=heartbeat_s,
            keepalive_s=5,
            straggle_s=(straggle_s or {}).get(device_id(index), 0.0),
            **(_secure_fields(secure, device_id(index)) if secure is not None else {}),
        )
        path = folder / "device.toml"
        path.write_text(to_toml(config), encoding="utf-8")
        paths.append(path)
    return paths


def _secure_fields(secure: SecureBroker, device: str) -> dict[str, str]:
    creds = secure.credentials[device]
    return {
        "ca_cert": str(creds.ca),
        "tls_cert": str(creds.cert),
        "tls_key": str(creds.key),
        "mqtt": "5",
        "task_signing_public_key": str(secure.security.task_signing_public_key),
        "result_key": str(creds.result_key),
    }


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> list[int | None]:
    """Wait for processes to exit (they were told to stop), then terminate, then kill stragglers.

    Interrupted while it waits (SIGINT, or SIGTERM turned into one), it kills those still running.
    """
    deadline = time.monotonic() + timeout_s
    try:
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
    except BaseException:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
        raise
    return [proc.returncode for proc in processes]


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated run.

    Attributes:
        engine: the algorithm's knobs (model, plan, overlap, local, loss, rounds, seed).
        partition: how the data is shared out.
        shards: the data already shared out (None: `partition` it into out/shards).
        out: the output folder.
        broker: an existing broker's URL, or None to start a private one.
        backend: the artifact kind devices train ("ort" or "executorch").
        memory_budget_bytes: every simulated device's memory budget.
        max_width_ratio: an optional width cap every device reports.
        round: per-round knobs.
        secure: with no `broker` given, run the private Mosquitto with throw-away credentials, mutual
            TLS and the run's ACL, signed tasks and authenticated results (False: anonymous plain TCP).
        straggle_s: device id -> seconds that device waits before each reply (simulated stragglers).
        launcher: how the devices run: "process" (one OS process each, on this machine) or "ray" (one Ray
            actor each, anywhere in a Ray cluster: `coordinator/fleet/ray_fleet.py`).
        ray: where and how the Ray actors run (launcher "ray" only).
        min_devices: live devices needed before each round (None: every device).
    """

    engine: EngineConfig
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    shards: ShardSet | None = None
    out: Path = Path("runs/simulate")
    broker: str | None = None
    backend: str = "ort"
    memory_budget_bytes: int = 1 << 30
    max_width_ratio: float | None = None
    round: RoundConfig = field(default_factory=RoundConfig)
    secure: bool = True
    straggle_s: Mapping[str, float] = field(default_factory=dict)
    launcher: str = "process"
    ray: RayOptions = field(default_factory=RayOptions)
    min_devices: int | None = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"the simulator's engine must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.min_devices is not None and self.min_devices < 1:
            raise ConfigError(f"min_devices must be >= 1, got {self.min_devices}")


LAUNCHERS = ("process", "ray")


def simulate(
    config: SimulationConfig,
    artifacts: ArtifactSource,
    progress: RunProgress | None = None,
    on_events: Callable[[RunEvents], None] | None = None,
) -> RunSummary:
    """Partition, start a broker (unless given) and N daemons (processes or Ray actors), run the coordinator, clean up.

    Returns:
        The run's summary (also in `config.out`/summary.json).
    """
    out = config.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    shards = config.shards if config.shards is not None else partition_data(config.partition, out / "shards")
    run_id = f"sim-{secrets.token_hex(3)}"  # fresh topics even on a shared broker
    broker: Broker | None = None
    secure: SecureBroker | None = None
    url = config.broker
    if url is None and config.secure:
        broker = secure = start_secure_broker(
            out / "logs" / "broker.log", run_id, [device_id(i) for i in range(len(shards.devices))]
        )
        url = broker.url
    elif url is None:
        broker = start_private_broker(out / "logs" / "broker.log")
        url = broker.url
    processes: list[subprocess.Popen[bytes]] = []
    actors: RayDevices | None = None
    ray_started = False
    try:  # from here on, whatever ends the run (KeyboardInterrupt: SIGINT, or SIGTERM in the CLI) stops it all
        paths = write_device_configs(
            out,
            shards,
            run_id,
            url,
            config.backend,
            config.memory_budget_bytes,
            config.max_width_ratio,
            secure=secure,
            straggle_s=config.straggle_s,
        )
        actors = RayDevices(config.ray) if config.launcher == "ray" else None
        if actors is None:
            for i, path in enumerate(paths):
                processes.append(start_device(path, out / "logs" / f"{device_id(i)}.log"))
        coordinator = CoordinatorConfig(
            engine=config.engine,
            run_id=run_id,
            broker=url,
            out=out,
            eval_shard=shards.test,
            validation_shard=shards.validation,
            backend=config.backend,
            round=config.round,
            fleet=FleetConfig(min_devices=config.min_devices or len(shards.devices), wait_s=120.0),
            security=secure.security.path if secure is not None else None,
            mqtt="5" if secure is not None else "3.1.1",
        )
        if actors is not None:  # the coordinator starts once every actor is placed (minutes for many)
            ray_started = connect(config.ray.address)
            actors.start(load_configs(paths), out / "logs")
        summary = run_coordinator(coordinator, artifacts, progress=progress, on_events=on_events)
    finally:
        # A daemon the coordinator told to stop exits on its own; one busy with a task hears that only after
        # the task, and stops at its next step or chunk on the SIGTERM `stop_processes` sends it.
        try:
            codes = stop_processes(processes) if actors is None else actors.stop()
            log.info("device exit codes: %s", codes)
        finally:
            if ray_started:
                disconnect()
            if broker is not None:
                broker.stop()
    return summary


@dataclass(frozen=True)
class PreparedData:
    """A partition read back as the fleet trains it: every device's data under the run's preprocessing."""

    devices: list[ArrayDataset]
    test: ArrayDataset
    validation: ArrayDataset | None
    preprocessing: Preprocessing


def load_shard_set(shards: ShardSet, model: ModelConfig | None = None) -> PreparedData:
    """Read a partition back for the reference engine, preprocessed exactly as the fleet does it.

    Each device folder is opened and reported as its daemon would, the reports
    are combined as the coordinator combines them, and every set is read under
    that preprocessing: the engine and the fleet train on the same numbers.
    """
    model = model if model is not None else ModelConfig(arch="cnn")
    sources = [open_source(shards.device_data(i)) for i in range(len(shards.devices))]
    reports = [s.report() for s in sources]
    prep = combine_reports(reports, model.inputs())
    devices = [materialize(s, prep) for s, r in zip(sources, reports) if not check_report(r, model.inputs())]
    spec = DataSpec(shards.test, channels=model.in_channels, image_size=model.image_size)
    test = materialize(open_source(spec), prep)
    validation = None
    if shards.validation is not None:
        validation = materialize(open_source(replace(spec, path=shards.validation)), prep)
    return PreparedData(devices, test, validation, prep)
