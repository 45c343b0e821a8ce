"""Simulated devices as Ray actors: `msfusion simulate --engine ray`, a fleet beyond one machine.

Each device is one Ray actor, and so one process of its own, somewhere in a Ray cluster. The actor runs
the real device daemon (`edge_runtime/daemon.py`) in a thread of that process, talking MQTT to the run's
broker exactly as a board does; the coordinator and the broker stay in the driver (`local_fleet.simulate`).

- Memory: the actor reserves Ray's `memory` resource equal to the device's budget, so Ray places no more
  devices on a node than its memory holds; the cap itself is the daemon's guard, which samples the actor
  process's RSS and fails a task past `memory_budget_bytes` (Ray's `memory` is a scheduling figure only).
- Failure: an actor is never restarted. Its process dying (killed, out of memory, its node lost) closes its
  MQTT connection, so it is a lost device: the round closes at its deadline with "no reply" from it.
- Torch: an actor's process cannot import it, as a board cannot (`RayOptions.hide_torch`).
- Paths: each actor gets its `DeviceConfig` through the actor call, but the paths inside it (data, state,
  TLS files) and the log file are read and written on the actor's node. On one machine (a local
  multi-node cluster) that is the run folder; on real machines it must be a shared filesystem mounted at
  the same path. The private broker listens on 127.0.0.1, so actors on other machines need `--broker`.

Ray is imported only here and only when this engine runs: a coordinator-side dependency (`pip install
msfusion[coordinator]`); `edge_runtime/` never imports it.
"""

from __future__ import annotations

import functools
import importlib.abc
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from msfusion.edge_runtime.config import DeviceConfig
from msfusion.errors import ConfigError

log = logging.getLogger(__name__)

# One training thread per simulated device, as the process simulator gives each daemon.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PLACEMENT_FILE = "placement.json"  # in the run's logs/: device id -> its Ray node id and actor pid
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the daemon's own (edge_runtime/__main__.py)


@dataclass(frozen=True)
class RayOptions:
    """Where and how the device actors run.

    Attributes:
        address: "auto" (a running cluster, else a local one started by `ray.init()`) or HOST:PORT of
            a cluster's head (what `ray start --head` prints).
        cpus_per_device: the CPU share each actor reserves. A device trains on one thread but is idle
            most of a round, so a small share lets many devices share a core (32 on two cores in the tests).
        resources: custom Ray resources each actor needs, cycled over the devices: device i gets
            `resources[i % len(resources)]` (e.g. `({"head_node": 1}, {"worker_node": 1})` alternates two
            nodes started with those resources); empty: Ray places them where they fit.
        start_timeout_s: how long every actor may take to be placed and started before the run fails.
        hide_torch: each actor's process cannot import torch, as a board has none (not with the
            "executorch" and "torch" backends, which need it). ONNX Runtime otherwise loads its torch integration on
            import where torch is installed: 3 s of CPU and 280 MiB of RSS more per device (measured).
    """

    address: str = "auto"
    cpus_per_device: float = 0.05
    resources: tuple[Mapping[str, float], ...] = ()
    start_timeout_s: float = 600.0
    hide_torch: bool = True

    def __post_init__(self) -> None:
        if not self.address:
            raise ConfigError("the Ray address must be 'auto' or HOST:PORT")
        if self.cpus_per_device <= 0 or self.start_timeout_s <= 0:
            raise ConfigError("cpus_per_device and start_timeout_s must be > 0")


class _NoTorch(importlib.abc.MetaPathFinder):
    """An import hook that refuses torch, as on a board (`import onnxruntime` then skips its torch part)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"no torch on a simulated board ({name})", name=name)
        return None


class DeviceActor:
    """One simulated device, in a Ray actor's own process (wrapped with `ray.remote` by `RayDevices`).

    `run` serves until the coordinator's stop (or `stop`) and returns the daemon's exit code; it runs in
    one of the actor's two threads, so `stop` can reach the daemon meanwhile.
    """

    def __init__(self, config: DeviceConfig, log_path: str, hide_torch: bool) -> None:
        if hide_torch and not {"executorch", "torch"} & set(config.backends) and "torch" not in sys.modules:
            sys.meta_path.insert(0, _NoTorch())
        from msfusion.edge_runtime.daemon import Daemon

        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        self.pid = os.getpid()
        self.daemon = Daemon(config)  # loads keys and TLS files: a ConfigError fails the actor's creation

    def ready(self) -> tuple[str, int]:
        """(the Ray node id this device runs on, its process id)."""
        import ray

        return ray.get_runtime_context().get_node_id(), self.pid

    def run(self) -> int:
        return int(self.daemon.run())

    def stop(self) -> None:
        self.daemon.stop()


def connect(address: str) -> bool:
    """Connect this process to Ray: `address`, or with "auto" a running cluster, else a new local one.

    Returns:
        True when this call connected (the caller then calls `disconnect()`), False when this process
        already was (a test, or a caller that chose its own `ray.init` options).

    Raises:
        ConfigError: Ray is not installed, or no cluster answers at `address`.
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "--engine ray needs Ray, a coordinator dependency: pip install 'msfusion[coordinator]'"
        ) from exc
    if ray.is_initialized():
        return False
    # The devices log to out/logs/devNNN.log; the driver's console is the coordinator's.
    init = functools.partial(ray.init, log_to_driver=False, configure_logging=False)
    if address == "auto":
        try:
            init(address="auto")
        except ConnectionError:
            log.info("no running Ray cluster found: starting a local one")
            init()
        return True
    try:
        init(address=address)
    except ConnectionError as exc:
        raise ConfigError(f"no Ray cluster at {address}: {exc}") from exc
    return True


def disconnect() -> None:
    """Undo `connect` (a local cluster it started stops with it)."""
    import ray

    ray.shutdown()


class RayDevices:
    """The device actors of one run: start them, wait until placed, stop them as `stop_processes` does."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.actors: list[Any] = []
        self.runs: list[Any] = []  # each actor's `run` ObjectRef
        self.placement: dict[str, tuple[str, int]] = {}  # device id -> (node id, pid)

    def start(self, configs: Sequence[DeviceConfig], logs: Path) -> None:
        """Create one actor per device and start its daemon; return once all are placed and running.

        Writes `logs`/placement.json (each device's node and pid); the actors log to `logs`/devNNN.log.

        Raises:
            ConfigError: not every actor could be placed (and started) within `start_timeout_s`: the
                cluster lacks the memory, CPU or custom resources the devices ask for.
        """
        import ray

        opts = self.options
        needed = sum(c.memory_budget_bytes for c in configs)
        have = ray.cluster_resources().get("memory", 0.0)
        if needed > have:
            log.warning(
                "the devices reserve %d MiB of Ray's memory resource, the cluster has %d MiB: some wait for nodes",
                needed >> 20,
                int(have) >> 20,
            )
        remote = ray.remote(DeviceActor)
        for index, config in enumerate(configs):
            actor = remote.options(
                name=f"msfusion-{config.run_id}-{config.device_id}",
                max_concurrency=2,  # `run` holds one thread; `stop` and `ready` use the other
                max_restarts=0,  # a failed actor is a lost device, as a failed board is
                num_cpus=opts.cpus_per_device,
                memory=config.memory_budget_bytes,
                resources=dict(opts.resources[index % len(opts.resources)]) if opts.resources else None,
                runtime_env={"env_vars": THREAD_ENV},
            ).remote(config, str(logs / f"{config.device_id}.log"), opts.hide_torch)
            self.actors.append(actor)
        ready = [actor.ready.remote() for actor in self.actors]
        done, pending = ray.wait(ready, num_returns=len(ready), timeout=opts.start_timeout_s)
        if pending:
            raise ConfigError(
                f"only {len(done)} of {len(ready)} device actors started within {opts.start_timeout_s:.0f} s; each "
                f"reserves {opts.cpus_per_device} CPU, its memory budget and {opts.resources or 'no custom resources'}"
                f" (cluster: {ray.cluster_resources()})"
            )
        for config, placed in zip(configs, ray.get(ready)):
            self.placement[config.device_id] = placed
        self.runs = [actor.run.remote() for actor in self.actors]
        table = {device: {"node": node, "pid": pid} for device, (node, pid) in self.placement.items()}
        (logs / PLACEMENT_FILE).write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
        per_node = Counter(node[:8] for node, _ in self.placement.values())
        log.info("%d device actors on %d Ray node(s): %s", len(configs), len(per_node), dict(per_node))

    def stop(self, timeout_s: float = 10.0) -> list[int | None]:
        """Wait for the daemons to exit (they were told to stop), then stop them, then kill every actor.

        Returns:
            Each device's exit code; None for a lost one (its actor died, or it did not stop in time).
        """
        if not self.actors:
            return []
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if self.runs:
            _, pending = ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
            if pending:
                index = {ref: i for i, ref in enumerate(self.runs)}
                for ref in pending:
                    self.actors[index[ref]].stop.remote()  # as SIGTERM stops a daemon process
                ray.wait(pending, num_returns=len(pending), timeout=5.0)
        codes: list[int | None] = []
        deadline = time.monotonic() + 1.0
        for ref in self.runs:
            try:
                codes.append(int(ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))))
            except (RayError, GetTimeoutError):  # RayActorError: the actor died (a lost device)
                codes.append(None)
        for actor in self.actors:
            ray.kill(actor)
        return codes


def load_configs(paths: Sequence[Path]) -> list[DeviceConfig]:
    """The device configs `write_device_configs` wrote, read here so each actor gets its own in the call."""
    from msfusion.edge_runtime.config import load_device_config

    return [load_device_config(path) for path in paths]
