"""Synthetic devices: the real daemon's protocol, transport and chunking, with a made-up slice instead of training.

For measuring the coordinator and the broker at fleet sizes one machine could
never train (`bench/scale.py`: 100 to 5,000 devices). A `SyntheticDaemon` is a
`Daemon` in every respect (registration, welcome, signed-task checks, the
ledger, heartbeats, its own MQTT connection and client id, the weights
fetched chunk by chunk and the slice uploaded the same way) except that it
does not fetch the artifact or train: its slice is the sub-model it was sent
plus seeded noise, after an optional delay (a straggler). Many run in one
host process, one thread each (plus paho's and the heartbeat's), sharing the
data report of one small data set:

    python -m msfusion.edge_runtime.synthetic --broker mqtt://127.0.0.1:1883 --run-id R \\
        --data samples.npz --state /tmp/synth --ids dev000,dev001,dev002 [--delay-s 0] [--heartbeat-s 5]

It exits when every device has been told to stop (or on SIGTERM / SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from msfusion.data.sources import DataSpec, detect_format, open_source
from msfusion.edge_runtime.config import DeviceConfig
from msfusion.edge_runtime.daemon import Daemon
from msfusion.edge_runtime.trainer import (
    TaskOutcome,
    TrainingStopped,
    check_task_sizes,
    pack_slice,
    slice_transfer_id,
)
from msfusion.errors import MsfusionError
from msfusion.wire.bulk import make_manifest
from msfusion.wire.codec import unpack
from msfusion.wire.protocol import DataReport, SliceResult, TaskFailed, TrainTask

log = logging.getLogger(__name__)

NOISE = 1e-3  # the synthetic update's scale: small, so the merged model stays finite over many rounds
MAX_PER_HOST = 300  # paho's select() sees descriptors < 1024 only, and each client holds three
THREAD_STACK_BYTES = 512 << 10  # a host runs thousands of threads: paho's, the heartbeat's and each daemon's


class SyntheticDaemon(Daemon):
    """A daemon whose slice is its sent sub-model plus seeded noise (no artifact, no training).

    Args:
        config: the device's config (its data is not opened: `report` stands for it).
        report: the data report it registers with (shared by a host's devices).
        delay_s: how long "training" takes (a straggler: larger).
    """

    # Hundreds of devices share a host's cores and its GIL: a PUBACK can take longer than on a board.
    publish_timeout_s = 120.0
    upload_timeout_s = 120.0

    def __init__(self, config: DeviceConfig, report: DataReport, delay_s: float = 0.0) -> None:
        super().__init__(config)
        self._report = report
        self.delay_s = delay_s

    def _open_data(self) -> DataReport:
        return self._report

    def _warm_up(self) -> None:
        return  # no runtime: nothing trains here

    def _train(self, task: TrainTask) -> TaskOutcome:
        started = time.perf_counter()
        try:
            check_task_sizes(task, self.config.memory_budget_bytes)
            received = self.fetch(task.weights, pull=False)
            start = unpack(received, task.codec, update=False)
            rng = np.random.default_rng(task.seed)
            trained = {
                name: (values + NOISE * rng.standard_normal(values.shape, dtype=np.float32)).astype(values.dtype)
                for name, values in start.items()
            }
            if self.delay_s > 0 and self._stop.wait(self.delay_s):
                raise TrainingStopped("stopping: the synthetic task is abandoned")
            # In the task's codec, as a board sends it (no residual: a synthetic device reads no state back).
            packed, local = pack_slice(task, received, trained)
            n_samples = (
                self._report.n_samples if task.max_samples == 0 else min(task.max_samples, self._report.n_samples)
            )
            reply: SliceResult | TaskFailed = SliceResult(
                run_id=task.run_id,
                round_idx=task.round_idx,
                device_id=task.device_id,
                task_id=task.task_id,
                weights=make_manifest(slice_transfer_id(task), "slice", packed),
                n_samples=max(1, n_samples),
                loss_curve=[],
                step_time_s=0.0,
                peak_rss_bytes=0,  # the host's memory is every device's: no figure of this one
                wall_s=time.perf_counter() - started,
            )
            return TaskOutcome(reply, packed, local)
        except TrainingStopped:
            raise
        except MsfusionError as exc:
            log.warning("synthetic task %s failed: %s", task.task_id, exc)
            failed = TaskFailed(
                run_id=task.run_id,
                round_idx=task.round_idx,
                device_id=task.device_id,
                task_id=task.task_id,
                code="protocol",
                reason=str(exc)[:4000],
            )
            return TaskOutcome(failed, None)


def host(
    configs: Sequence[DeviceConfig],
    report: DataReport,
    delays: Sequence[float] | None = None,
    stop: threading.Event | None = None,
) -> list[SyntheticDaemon]:
    """Run synthetic devices, one thread each, until all have stopped (or `stop` is set); returns them."""
    threading.stack_size(THREAD_STACK_BYTES)
    # paho waits in select(), which takes descriptors below 1024: three per client (its socket and wake-up pair)
    if len(configs) > MAX_PER_HOST:
        raise ValueError(f"{len(configs)} devices in one host: at most {MAX_PER_HOST} (select() limits descriptors)")
    daemons = [SyntheticDaemon(c, report, (delays or [0.0] * len(configs))[i]) for i, c in enumerate(configs)]
    threads = [threading.Thread(target=d.run, name=d.config.device_id, daemon=True) for d in daemons]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if stop is not None and stop.is_set():
            for d in daemons:
                d.stop()
        for t in threads:
            t.join(timeout=0.5)
            if stop is not None and stop.is_set():
                break
    return daemons


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--data", type=Path, required=True, help="the data set whose report every device registers")
    p.add_argument("--state", type=Path, required=True, help="a folder for the devices' state folders")
    p.add_argument("--ids", required=True, help="the devices' ids, comma-separated (the coordinator's side names them)")
    p.add_argument("--delay-s", type=float, default=0.0, help="seconds each task takes")
    p.add_argument("--slow-ids", default="", help="comma-separated ids of devices that take --slow-delay-s instead")
    p.add_argument("--slow-delay-s", type=float, default=0.0)
    p.add_argument("--heartbeat-s", type=float, default=5.0)
    p.add_argument("--keepalive-s", type=int, default=30)
    p.add_argument("--stall-s", type=float, default=30.0, help="seconds without a chunk before asking again")
    p.add_argument("--memory-budget-mb", type=int, default=1024)
    p.add_argument("--max-width-ratio", type=float, default=None)
    p.add_argument("--backend", default="ort")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (the host log is every device's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(threadName)s %(levelname)s %(message)s")
    spec = DataSpec(path=args.data.resolve(), format=detect_format(args.data))
    report = open_source(spec).report()
    ids = [i for i in args.ids.split(",") if i]
    slow = {i for i in args.slow_ids.split(",") if i}
    configs = [
        DeviceConfig(
            device_id=i,
            run_id=args.run_id,
            data=spec,
            state_dir=(args.state / i / "state").resolve(),
            memory_budget_bytes=args.memory_budget_mb << 20,
            broker=args.broker,
            backends=(args.backend,),
            max_width_ratio=args.max_width_ratio,
            heartbeat_s=args.heartbeat_s,
            keepalive_s=args.keepalive_s,
            stall_s=args.stall_s,
        )
        for i in ids
    ]
    delays = [args.slow_delay_s if i in slow else args.delay_s for i in ids]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemons = host(configs, report, delays, stop)
    codes = {int(d.exit_code) for d in daemons}
    return max(codes) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
