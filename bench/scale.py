"""The coordinator and the broker at fleet scale: 100, 1,000 and 5,000 synthetic devices against a real Mosquitto.

Each device is a `SyntheticDaemon` (edge_runtime/synthetic.py): the real
daemon, protocol, transport and chunking, with its own MQTT connection, but a
made-up slice instead of training, so one machine can stand up thousands.
They run in host processes of at most 300 devices each; the coordinator is
the real one (`run_coordinator`), in this process, so its CPU time and memory
are this process's. Mosquitto runs with `FLEET_SETTINGS`
(coordinator/fleet/broker.py).

    .venv/bin/python bench/scale.py [--devices 100,1000,5000] [--rounds 3] [--out bench/results/scale.json]

Prints, per fleet size and round (the first round, which exports the
artifact, is shown but left out of the means): the coordinator's CPU time,
its peak RSS, the broker's messages/s and bytes/s (in and out, from
$SYS/broker), the time from the first task sent to the last slice in, and
the share of the round the coordinator spent working (plan + slice + publish
+ merge over the round's wall time). Every host process shares this
machine's cores with the coordinator and the broker: wall times include
that contention.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import paho.mqtt.client as mqtt

from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
from msfusion.coordinator.fleet.broker import FLEET_SETTINGS, MosquittoBroker, mosquitto_binary
from msfusion.coordinator.fleet.config import CoordinatorConfig, FleetConfig, RoundConfig
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    partition_data,
    start_synthetic_hosts,
    stop_processes,
)
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.coordinator.fleet.rounds import RoundOutcome
from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.edge_runtime.synthetic import MAX_PER_HOST
from msfusion.models.config import ModelConfig
from msfusion.models.registry import model_spec
from msfusion.recipe import EngineConfig, LocalTrainConfig

SYS_TOPICS = ("messages/received", "messages/sent", "bytes/received", "bytes/sent", "clients/connected")


class BrokerStats:
    """The broker's own counters ($SYS/broker/...), the newest value of each."""

    def __init__(self, host: str, port: int) -> None:
        self.values: dict[str, float] = {}
        self._lock = threading.Lock()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"stats-{secrets.token_hex(3)}")
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        for topic in SYS_TOPICS:
            self._client.subscribe(f"$SYS/broker/{topic}")
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            value = float(message.payload.decode())
        except ValueError:
            return
        with self._lock:
            self.values[message.topic.removeprefix("$SYS/broker/")] = value

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class Probe:
    """A `RunProgress` that records the coordinator process's CPU time, RSS and the broker's counters per round."""

    def __init__(self, stats: BrokerStats) -> None:
        self.stats = stats
        self.started: dict[int, dict[str, Any]] = {}  # round -> at its first tick
        self.ended: dict[int, dict[str, Any]] = {}  # round -> when it was done
        self.registered_at: float | None = None

    def _mark(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "cpu_s": time.process_time(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "broker": self.stats.snapshot(),
        }

    def waiting(self, registered: int, needed: int) -> None:
        return

    def tick(self, round_idx: int, devices: Mapping[str, str], replies: Mapping[str, str]) -> None:
        if round_idx not in self.started:
            self.started[round_idx] = self._mark()
            if self.registered_at is None:
                self.registered_at = self.started[round_idx]["t"]

    def round_done(self, outcome: RoundOutcome) -> None:
        self.ended[outcome.round_idx] = self._mark()

    def window(self, round_idx: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The marks a round's figures are measured between: the last round's end (or its own start) and its end."""
        end = self.ended.get(round_idx)
        before = self.ended.get(round_idx - 1, self.started.get(round_idx))
        return (before, end) if end is not None and before is not None else None


def run_fleet(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Stand up `n` synthetic devices, run the coordinator for `args.rounds` rounds, return the figures."""
    binary = mosquitto_binary()
    if binary is None:
        raise SystemExit("bench/scale.py needs Mosquitto (apt-get install mosquitto)")
    folder = work / f"n{n}"
    shards = partition_data(
        PartitionConfig(devices=1, scheme="iid", samples_per_device=args.samples, test_samples=500), folder / "shards"
    )
    data = shards.device_data(0)
    # The devices' state (ledger: each reply fsynced) in memory where it can be: on a board each has its own
    # disk, here thousands would queue on one and the figures would be this disk's, not the coordinator's.
    shm = Path("/dev/shm")
    states = Path(tempfile.mkdtemp(prefix="msfusion-scale-devices-", dir=shm if shm.is_dir() else folder))
    broker = MosquittoBroker(binary, folder / "broker.log", settings=FLEET_SETTINGS)
    stats = BrokerStats("127.0.0.1", broker.port)
    run_id = f"scale-{secrets.token_hex(3)}"
    started = time.monotonic()
    hosts = start_synthetic_hosts(
        broker.url,
        run_id,
        Path(data.path),
        states,
        n,
        folder,
        per_host=min(args.per_host, MAX_PER_HOST),
        heartbeat_s=args.heartbeat_s,
        extra=["--log-level", args.host_log_level, "--stall-s", str(args.stall_s)],
    )
    model = ModelConfig(arch="cnn", channels=tuple(int(c) for c in args.channels.split(",")))
    engine = EngineConfig(model=model, local=LocalTrainConfig(max_samples=args.samples), rounds=args.rounds)
    config = CoordinatorConfig(
        engine=engine,
        run_id=run_id,
        broker=broker.url,
        out=folder / "run",
        eval_shard=shards.test,
        backend="ort",
        artifact_cache=work / "artifact-cache",
        round=RoundConfig(deadline_s=args.deadline_s, quorum=0.9, stall_s=args.stall_s),
        fleet=FleetConfig(min_devices=n, wait_s=args.wait_s, heartbeat_timeout_s=max(30.0, 6 * args.heartbeat_s)),
    )
    probe = Probe(stats)
    try:
        summary = run_coordinator(
            config, ExportedArtifacts(engine, "ort", cache_dir=work / "artifact-cache"), progress=probe
        )
    finally:
        codes = stop_processes(hosts, timeout_s=60)
        stats.close()
        broker.stop()
        shutil.rmtree(states, ignore_errors=True)
    lines = [line for line in read_metrics(config.out) if line["merged"]]
    rounds = []
    for line in lines:
        marks = probe.window(line["round_idx"])
        if marks is None:
            continue
        before, after = marks
        t = line["timings_s"]
        wall = line["wall_s"]
        b0, b1 = before["broker"], after["broker"]

        def rate(key: str, b0: dict[str, float] = b0, b1: dict[str, float] = b1, wall: float = wall) -> float:
            return (b1.get(key, 0.0) - b0.get(key, 0.0)) / wall if wall > 0 else float("nan")

        work_s = sum(t.get(k, 0.0) for k in ("plan_s", "slice_s", "publish_s", "merge_s"))
        rounds.append(
            {
                "round": line["round_idx"],
                "merged": line["merged"],
                "slices": len(line.get("slice_bytes", {})),
                "wall_s": wall,
                "coordinator_cpu_s": after["cpu_s"] - before["cpu_s"],
                "peak_rss_mb": after["peak_rss_bytes"] / 2**20,
                "msgs_per_s": rate("messages/received") + rate("messages/sent"),
                "mb_per_s": (rate("bytes/received") + rate("bytes/sent")) / 1e6,
                "first_task_to_last_slice_s": t.get("publish_s", 0.0) + t.get("collect_s", 0.0),
                "coordinator_share": work_s / wall if wall > 0 else float("nan"),
                "timings_s": t,
            }
        )
    # Over every round but the first (the $SYS figures come once a second: a short round can see none)
    later = [probe.window(line["round_idx"]) for line in lines[1:]]
    spans = [w for w in later if w is not None]
    run_rates: dict[str, float] = {}
    if spans:
        first, last = spans[0][0], spans[-1][1]
        span = last["t"] - first["t"]
        for key in ("messages/received", "messages/sent", "bytes/received", "bytes/sent"):
            run_rates[key] = (last["broker"].get(key, 0.0) - first["broker"].get(key, 0.0)) / span if span > 0 else 0.0
    return {
        "devices": n,
        "hosts": len(hosts),
        "broker_msgs_per_s": run_rates.get("messages/received", 0.0) + run_rates.get("messages/sent", 0.0),
        "broker_mb_per_s": (run_rates.get("bytes/received", 0.0) + run_rates.get("bytes/sent", 0.0)) / 1e6,
        "host_exit_codes": codes,
        "parameters": model_spec(model).param_count(),
        "registration_s": (probe.registered_at or float("nan")) - started,
        "ok": summary.ok,
        "rounds": rounds,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'N':>6} {'round':>5} {'slices':>6} {'wall s':>7} {'coord cpu s':>11} {'peak RSS MB':>11} "
        f"{'msgs/s':>8} {'MB/s':>6} {'task->slice s':>13} {'coord share':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for r in row["rounds"]:
            print(
                f"{row['devices']:6d} {r['round'] + 1:5d} {r['slices']:6d} {r['wall_s']:7.1f} "
                f"{r['coordinator_cpu_s']:11.2f} {r['peak_rss_mb']:11.0f} {r['msgs_per_s']:8.0f} "
                f"{r['mb_per_s']:6.2f} {r['first_task_to_last_slice_s']:13.1f} {100 * r['coordinator_share']:10.1f}%"
            )
    print("\nmeans over rounds 2.. (round 1 exports the artifact):")
    for row in rows:
        later = row["rounds"][1:] or row["rounds"]
        if not later:
            continue

        def mean(key: str, later: list[dict[str, Any]] = later) -> float:
            return statistics.mean(r[key] for r in later)

        print(
            f"  N = {row['devices']:5d} ({row['hosts']} hosts, registered in {row['registration_s']:.0f} s): "
            f"coordinator {mean('coordinator_cpu_s'):.2f} s CPU per round "
            f"({1e3 * mean('coordinator_cpu_s') / row['devices']:.2f} ms per device), "
            f"peak RSS {max(r['peak_rss_mb'] for r in row['rounds']):.0f} MB, "
            f"broker {row.get('broker_msgs_per_s', mean('msgs_per_s')):.0f} msgs/s, "
            f"{row.get('broker_mb_per_s', mean('mb_per_s')):.2f} MB/s, "
            f"first task to last slice {mean('first_task_to_last_slice_s'):.1f} s, "
            f"coordinator share {100 * mean('coordinator_share'):.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="100,1000,5000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--channels", default="32,64,128", help="CNN conv widths")
    p.add_argument("--samples", type=int, default=64, help="samples each device reports and 'trains'")
    p.add_argument("--per-host", type=int, default=MAX_PER_HOST, help="devices per host process")
    p.add_argument("--heartbeat-s", type=float, default=5.0)
    p.add_argument("--deadline-s", type=float, default=300.0)
    p.add_argument("--wait-s", type=float, default=1200.0, help="how long registration may take")
    p.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    p.add_argument("--from-json", type=Path, default=None)
    p.add_argument("--host-log-level", default="WARNING")
    p.add_argument("--stall-s", type=float, default=30.0, help="devices and coordinator: seconds without a chunk")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, metrics)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.from_json is not None:
        print_table(json.loads(args.from_json.read_text())["rows"])
        return 0
    rows: list[dict[str, Any]] = []
    work = args.keep if args.keep is not None else Path(tempfile.mkdtemp(prefix="msfusion-scale-"))
    try:
        for n in (int(x) for x in args.devices.split(",")):
            print(f"-- {n} devices in {math.ceil(n / min(args.per_host, MAX_PER_HOST))} host processes", flush=True)
            rows.append(run_fleet(n, args, work))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"meta": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
            )
            print_table(rows[-1:])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n== all fleet sizes")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
