"""Fleet overhead benchmark: a simulated fleet over a private Mosquitto, figures per round.

Prints, per round: wall time; the coordinator's own overhead (plan + slice +
publish + merge) as a share of it; bytes sent to each device against the fp32
size of its slice (after round 1 the artifact is cached on the device, so
only weights travel); and merge throughput, both in the run and in a
stand-alone measurement of `MergeAccumulator`. Targets are printed, not
asserted: overhead <= 5% at 8 devices, bytes per round <= 1.05x slice bytes
after the first round.

`--merge` prints only the stand-alone merge figure (no simulation): MB of
slices per second, the accumulator's size over the model's fp32 size and the
merged model's largest difference from a float64 merge, for the run's model
and a 5.9M-parameter CNN at 8, 32 and 128 devices, on both merge paths.

`--dashboard` runs the same simulation twice, side by side: without the
dashboard, then with it serving and a client reading it as a browser does (the
SSE stream open, the run's picture fetched after every event). It prints the
coordinator's own time per round (everything but waiting for devices) and the
wall time per round, off and on; the target is within 1%.

`--secure` runs it twice per mode, alternated: `msfusion simulate --insecure`
(anonymous plain TCP) and the default (throw-away credentials, mutual TLS,
the run's ACL, MQTT 5, signed tasks, MACed results). It prints the wall time
of each run and per round, the coordinator's own time per round, and the final
accuracy of both (the same seeds: it must be the same).

`--async` runs the simulation three ways with `--stragglers` devices that
wait `--straggle-s` before every reply (msfusion-device's `straggle_s`):
synchronous rounds that wait for every device (deadline 600 s), synchronous
rounds that close at `--deadline-s` and drop what comes later, and
asynchronous rounds with the same deadline that merge a late slice into a
later round with the staleness weight. It prints each mode's test accuracy
at the same wall time (the shortest run's training time, export left out),
the final accuracy, and the device idle share: 1 - (device-seconds from a
task sent to its slice arriving, counted for slices that arrived) /
(devices x wall time), so time spent on a slice that is dropped is idle too.

    .venv/bin/python bench/fleet.py --devices 8 --rounds 4 --out bench/results/fleet [--dashboard | --secure]
    .venv/bin/python bench/fleet.py --async --rounds 12 --stragglers 2 --straggle-s 20 --deadline-s 10
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from msfusion.algorithm.merging import MergeAccumulator, MergeConfig, SliceUpdate
from msfusion.algorithm.planning import DeviceSlot, PlanConfig, plan_round
from msfusion.algorithm.slicing import slice_weights
from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
from msfusion.coordinator.fleet.config import RoundConfig
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    SimulationConfig,
    simulate,
)
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.models.config import ModelConfig
from msfusion.models.registry import build_model, model_spec, state_to_numpy
from msfusion.recipe import EngineConfig, LocalTrainConfig

OVERHEAD = ("plan_s", "slice_s", "publish_s", "merge_s")


def _slices(model: ModelConfig, devices: int, ratio: float) -> tuple[Any, dict[str, Any], list[SliceUpdate]]:
    """A round's slices of `model`, each perturbed like a trained one (seeded)."""
    spec = model_spec(model)
    weights = state_to_numpy(build_model(model, seed=0))
    plan = plan_round(spec, [DeviceSlot(f"d{i}", ratio) for i in range(devices)], 0, 0.5, PlanConfig())
    rng = np.random.default_rng(0)
    updates = []
    for i, d in enumerate(plan.windows):
        sub = slice_weights(weights, spec, plan.units(d))
        sub = {n: a + 0.01 * rng.standard_normal(a.shape, dtype=np.float32) for n, a in sub.items()}
        updates.append(SliceUpdate(d, 0, plan.units(d), sub, 100 + i))
    return spec, weights, updates


def _float64_merge(spec: Any, weights: dict[str, Any], updates: list[SliceUpdate]) -> dict[str, Any]:
    """The merge as the paper writes it, in float64 with fancy indexing: the reference for the figure's error."""
    from msfusion.algorithm.indexing import open_index

    out = {}
    for name, old in weights.items():
        total = np.zeros(old.shape)
        wsum = np.zeros(old.shape)
        for u in updates:
            at = open_index(old.shape, spec.tensor_index(name, u.units))
            total[at] += u.n_samples * u.weights[name].astype(np.float64)
            wsum[at] += u.n_samples
        out[name] = np.where(wsum > 0, total / np.where(wsum > 0, wsum, 1), old)
    return out


def merge_throughput(
    model: ModelConfig, devices: int, ratio: float, repeats: int = 5, streaming: bool = False
) -> float:
    """MB of fp32 slices folded into the global model per second by MergeAccumulator (add + result)."""
    return merge_figures(model, devices, ratio, repeats, streaming)["mb_s"]


def merge_figures(
    model: ModelConfig, devices: int, ratio: float, repeats: int = 5, streaming: bool = False
) -> dict[str, float]:
    """Merge throughput (best of `repeats`), accumulator memory over the model's fp32 size, error vs float64."""
    spec, weights, updates = _slices(model, devices, ratio)
    config = MergeConfig(norm_bound=0) if streaming else MergeConfig()
    size = sum(sum(a.nbytes for a in u.weights.values()) for u in updates)
    best = float("inf")
    merged: dict[str, Any] = {}
    acc = None
    for _ in range(repeats):
        started = time.perf_counter()
        acc = MergeAccumulator(weights, spec, 0, config)
        for update in updates:
            acc.add(update)
        merged, _ = acc.result()
        best = min(best, time.perf_counter() - started)
    model_bytes = sum(a.nbytes for a in weights.values())
    reference = _float64_merge(spec, weights, updates)
    error = max(float(np.abs(merged[n].astype(np.float64) - reference[n]).max()) for n in weights)
    return {
        "mb_s": size / best / 1e6,
        "slice_mb": size / 1e6,
        "model_mb": model_bytes / 1e6,
        "seconds": best,
        "accumulator_x_model": acc.accumulator_bytes() / model_bytes if acc is not None else float("nan"),
        "max_abs_error_vs_float64": error,
    }


def merge_table(run_model: ModelConfig, devices: int, ratio: float) -> list[dict[str, Any]]:
    """The stand-alone merge figure: the run's model and a 5.9M-parameter CNN at 8-128 devices, both merge paths."""
    big = ModelConfig(arch="cnn", channels=(256, 512, 1024))
    cases = [(run_model, devices, ratio)] + [(big, n, 0.25) for n in (8, 32, 128)]
    rows = []
    print(
        f"\n{'model':>14} {'N':>4} {'path':>9} {'slices MB':>10} {'model MB':>9} {'ms':>7} {'MB/s':>7} "
        f"{'acc/model':>9} {'err vs f64':>11}"
    )
    for m, n, r in cases:
        for streaming in (False, True):
            f = merge_figures(m, n, r, repeats=3, streaming=streaming)
            label = "-".join(str(c) for c in m.channels)
            path = "streaming" if streaming else "kept"
            print(
                f"{label:>14} {n:4d} {path:>9} {f['slice_mb']:10.1f} {f['model_mb']:9.1f} {1e3 * f['seconds']:7.1f} "
                f"{f['mb_s']:7.0f} {f['accumulator_x_model']:9.2f} {f['max_abs_error_vs_float64']:11.2e}"
            )
            rows.append({"channels": list(m.channels), "devices": n, "ratio": r, "path": path, **f})
    return rows


READER = """
import sys, time, httpx
url = sys.argv[1]
with httpx.Client(base_url=url, timeout=10) as client:
    while True:
        try:
            runs = client.get("/api/runs").json()
            if not runs:
                time.sleep(0.2)
                continue
            run = runs[0]["id"]
            with client.stream("GET", f"/api/runs/{run}/events", params={"since": 0}) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        print(1, flush=True)
                        client.get(f"/api/runs/{run}")
        except httpx.HTTPError:
            time.sleep(0.2)
"""


def dashboard_overhead(args: argparse.Namespace, config: SimulationConfig, engine: EngineConfig) -> None:
    """The simulation off and on the dashboard: coordinator time and wall time per round, side by side."""
    from dataclasses import replace

    from msfusion.coordinator.dashboard.app import RunsView
    from msfusion.coordinator.dashboard.server import Dashboard, DashboardOptions

    own: dict[str, list[float]] = {"off": [], "on": []}
    walls: dict[str, list[float]] = {"off": [], "on": []}
    seen: list[int] = []
    for i, mode in enumerate(["off", "on"] * args.repeats):  # alternated: drift on the machine hits both alike
        out = args.out / f"dashboard-{mode}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = replace(config, out=out)
        artifacts = ExportedArtifacts(engine, args.backend, cache_dir=args.out / "artifact-cache")
        if mode == "off":
            simulate(cfg, artifacts)
        else:
            view = RunsView()
            server = Dashboard(view, DashboardOptions()).start()
            # A browser is another process: the reader is one too (its own GIL), reading as the page does.
            reader = subprocess.Popen([sys.executable, "-c", READER, server.url], stdout=subprocess.PIPE, text=True)
            try:
                simulate(cfg, artifacts, on_events=lambda events, view=view: view.add_live("bench", events))
            finally:
                reader.terminate()
                out_text, _ = reader.communicate(timeout=10)
                seen.extend(1 for _ in out_text.split())
                server.stop()
        lines = [line for line in read_metrics(out) if line["merged"]][1:]  # round 1 exports: left out
        own[mode] += [sum(v for k, v in line["timings_s"].items() if k != "collect_s") for line in lines]
        walls[mode] += [line["wall_s"] for line in lines]
    own_off, own_on = float(np.mean(own["off"])), float(np.mean(own["on"]))
    wall_off, wall_on = float(np.mean(walls["off"])), float(np.mean(walls["on"]))
    events = len(seen)
    print(
        f"\ndashboard overhead, {args.devices} devices, rounds 2..{args.rounds}, {args.repeats} runs each, "
        f"alternated (a client read {events} events)"
    )
    print(
        f"  coordinator time per round: off {1e3 * own_off:.1f} ms, on {1e3 * own_on:.1f} ms ({100 * (own_on / own_off - 1):+.2f}%)"
    )
    print(
        f"  wall time per round:        off {wall_off:.3f} s, on {wall_on:.3f} s ({100 * (wall_on / wall_off - 1):+.2f}%)"
    )
    added = (own_on - own_off) / wall_off
    print(
        f"target: the dashboard adds <= 1% to a round: {100 * added:+.2f}% of the round ({'met' if added <= 0.01 else 'NOT met'})"
    )


def security_overhead(args: argparse.Namespace, config: SimulationConfig, engine: EngineConfig) -> None:
    """The simulation insecure and secure (TLS + ACL + signatures + MACs), alternated: wall times and accuracy."""
    from dataclasses import replace

    runs: dict[str, list[float]] = {"insecure": [], "secure": []}
    rounds: dict[str, list[float]] = {"insecure": [], "secure": []}
    own: dict[str, list[float]] = {"insecure": [], "secure": []}
    final: dict[str, set[str]] = {"insecure": set(), "secure": set()}
    for i, mode in enumerate(["insecure", "secure"] * args.repeats):
        out = args.out / f"{mode}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = replace(config, out=out, secure=mode == "secure")
        artifacts = ExportedArtifacts(engine, args.backend, cache_dir=args.out / "artifact-cache")
        start = time.perf_counter()
        summary = simulate(cfg, artifacts)
        runs[mode].append(time.perf_counter() - start)
        lines = [line for line in read_metrics(out) if line["merged"]][1:]  # round 1 exports: left out
        rounds[mode] += [line["wall_s"] for line in lines]
        own[mode] += [sum(v for k, v in line["timings_s"].items() if k != "collect_s") for line in lines]
        final[mode].add(json.dumps(summary.final_metrics, sort_keys=True))
    print(f"\nsecurity overhead, {args.devices} devices, {args.rounds} rounds, {args.repeats} runs each, alternated")
    for mode in ("insecure", "secure"):
        print(
            f"  {mode:>8}: run wall {np.mean(runs[mode]):.2f} s (runs {', '.join(f'{r:.2f}' for r in runs[mode])}), "
            f"round wall (rounds 2..) {np.mean(rounds[mode]):.3f} s, coordinator {1e3 * np.mean(own[mode]):.1f} ms/round, "
            f"final {sorted(final[mode])}"
        )
    ratio = np.mean(rounds["secure"]) / np.mean(rounds["insecure"])
    print(f"  secure / insecure round wall: {ratio:.3f}x; same final metrics: {final['secure'] == final['insecure']}")


def asynchronous_rounds(args: argparse.Namespace, config: SimulationConfig, engine: EngineConfig) -> None:
    """Synchronous (waiting, dropping) against asynchronous rounds with stragglers: accuracy at equal wall, idle share."""
    from dataclasses import replace

    stragglers = {f"dev{i:03d}": args.straggle_s for i in range(args.devices - args.stragglers, args.devices)}
    modes = {
        "sync-wait": RoundConfig(deadline_s=600),
        "sync-drop": RoundConfig(deadline_s=args.deadline_s, quorum=0.5),
        "async": RoundConfig(deadline_s=args.deadline_s, quorum=0.5, asynchronous=True),
    }
    # Rounds without the stragglers are short: a straggler's slice is several rounds late.
    late_engine = replace(engine, merge=replace(engine.merge, max_staleness=args.max_staleness))
    curves: dict[str, list[tuple[float, float]]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for mode, round_config in modes.items():
        out = args.out / mode
        shutil.rmtree(out, ignore_errors=True)
        cfg = replace(config, out=out, round=round_config, straggle_s=stragglers, engine=late_engine)
        artifacts = ExportedArtifacts(late_engine, args.backend, cache_dir=args.out / "artifact-cache")
        simulate(cfg, artifacts)
        lines = read_metrics(out)
        wall, curve, busy, late = 0.0, [], 0.0, 0
        for line in lines:
            wall += line["wall_s"] - line["timings_s"].get("export_s", 0.0)
            busy += sum(line.get("reply_s", {}).values())
            late += sum(1 for note in line.get("late", {}).values() if note.startswith("merged"))
            if line["merged"]:
                curve.append((wall, line["metrics"]["accuracy"]))
        curves[mode] = curve
        rows[mode] = {
            "wall_s": wall,
            "rounds_merged": len(curve),
            "final_accuracy": curve[-1][1] if curve else float("nan"),
            "idle_share": 1 - busy / (args.devices * wall),
            "late_slices_merged": late,
        }
    horizon = min(row["wall_s"] for row in rows.values())
    for mode, curve in curves.items():
        before = [acc for t, acc in curve if t <= horizon + 1e-9]
        rows[mode]["accuracy_at_equal_wall"] = before[-1] if before else float("nan")
    print(
        f"\nasynchronous rounds: {args.devices} devices, {args.stragglers} waiting {args.straggle_s:g} s per reply, "
        f"deadline {args.deadline_s:g} s, {args.rounds} rounds, max staleness {args.max_staleness}; "
        f"equal wall time {horizon:.1f} s"
    )
    print(
        f"{'mode':>10} {'wall s':>7} {'rounds':>6} {'acc @ equal wall':>16} {'final acc':>9} {'idle':>6} {'late merged':>11}"
    )
    for mode, row in rows.items():
        print(
            f"{mode:>10} {row['wall_s']:7.1f} {row['rounds_merged']:6d} {row['accuracy_at_equal_wall']:16.4f} "
            f"{row['final_accuracy']:9.4f} {100 * row['idle_share']:5.1f}% {row['late_slices_merged']:11d}"
        )
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "horizon_s": horizon, "modes": rows}
    (args.out / "async.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"json: {args.out / 'async.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--channels", default="64,128,256", help="CNN conv widths")
    parser.add_argument("--ratio", type=float, default=0.25, help="every device's width cap")
    parser.add_argument("--local-samples", type=int, default=256, help="samples per local epoch")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleet"))
    parser.add_argument("--dashboard", action="store_true", help="compare rounds with the dashboard off and on")
    parser.add_argument("--secure", action="store_true", help="compare runs insecure and secure (TLS, ACL, keys)")
    parser.add_argument("--merge", action="store_true", help="only the stand-alone merge figure (no simulation)")
    parser.add_argument("--repeats", type=int, default=2, help="--dashboard, --secure: runs per mode, alternated")
    parser.add_argument("--async", dest="asynchronous", action="store_true", help="sync vs async rounds, stragglers")
    parser.add_argument("--stragglers", type=int, default=2, help="--async: devices that are slow")
    parser.add_argument("--straggle-s", type=float, default=12.0, help="--async: their wait before each reply")
    parser.add_argument("--deadline-s", type=float, default=8.0, help="--async: the round deadline (sync-drop, async)")
    parser.add_argument("--max-staleness", type=int, default=8, help="--async: rounds late a slice may be merged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = ModelConfig(arch="cnn", channels=tuple(int(c) for c in args.channels.split(",")))
    engine = EngineConfig(model=model, local=LocalTrainConfig(max_samples=args.local_samples), rounds=args.rounds)
    if args.out.exists():
        shutil.rmtree(args.out)
    config = SimulationConfig(
        engine=engine,
        partition=PartitionConfig(
            devices=args.devices, scheme="iid", samples_per_device=2 * args.local_samples, test_samples=1000
        ),
        out=args.out,
        backend=args.backend,
        max_width_ratio=args.ratio,
        round=RoundConfig(deadline_s=600),
    )
    if args.merge:
        rows = merge_table(model, args.devices, args.ratio)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "merge.json").write_text(json.dumps(rows, indent=1))
        print(f"json: {args.out / 'merge.json'}")
        return 0
    if args.dashboard:
        dashboard_overhead(args, config, engine)
        return 0
    if args.secure:
        security_overhead(args, config, engine)
        return 0
    if args.asynchronous:
        args.out.mkdir(parents=True, exist_ok=True)
        asynchronous_rounds(args, config, engine)
        return 0
    summary = simulate(config, ExportedArtifacts(engine, args.backend, cache_dir=args.out / "artifact-cache"))
    lines = [line for line in read_metrics(args.out) if line["merged"]]
    print(
        f"\n{args.devices} devices, CNN {args.channels}, width cap {args.ratio}, {args.backend}; "
        f"{model_spec(model).param_count()} parameters; final {summary.final_metrics}"
    )
    header = f"{'round':>5} {'wall s':>7} {'plan ms':>8} {'slice ms':>9} {'pub ms':>7} {'merge ms':>9} {'overhead':>9} {'KB down/dev':>12} {'KB slice':>9} {'down/slice':>11} {'up/slice':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for line in lines:
        t = line["timings_s"]
        wall = line["wall_s"]
        overhead = sum(t.get(k, 0.0) for k in OVERHEAD)
        down = np.mean(list(line["bytes_down"].values()))
        up = np.mean(list(line["bytes_up"].values()))
        fp32 = np.mean(list(line["slice_bytes"].values()))
        rows.append(
            {
                "round": line["round_idx"],
                "wall_s": wall,
                "overhead_share": overhead / wall,
                "bytes_down_per_device": down,
                "bytes_up_per_device": up,
                "slice_bytes": fp32,
            }
        )
        print(
            f"{line['round_idx'] + 1:5d} {wall:7.2f} {1e3 * t['plan_s']:8.1f} {1e3 * t['slice_s']:9.1f} "
            f"{1e3 * t['publish_s']:7.1f} {1e3 * t['merge_s']:9.1f} {100 * overhead / wall:8.2f}% "
            f"{down / 1e3:12.1f} {fp32 / 1e3:9.1f} {down / fp32:11.3f} {up / fp32:9.3f}"
        )
    merged_mb = sum(sum(line["slice_bytes"].values()) for line in lines) / 1e6
    merge_s = sum(line["timings_s"]["merge_s"] for line in lines)
    standalone = merge_throughput(model, args.devices, args.ratio)
    later = rows[1:] or rows
    print(f"\nmerge throughput: {merged_mb / merge_s:.0f} MB/s in the run, {standalone:.0f} MB/s stand-alone")
    worst_overhead = max(r["overhead_share"] for r in rows)
    worst_bytes = max(r["bytes_down_per_device"] / r["slice_bytes"] for r in later)
    print(
        f"target overhead <= 5% at 8 devices: worst {100 * worst_overhead:.2f}% "
        f"({'met' if worst_overhead <= 0.05 else 'NOT met'})"
    )
    print(
        f"target bytes per round <= 1.05x slice after round 1: worst {worst_bytes:.3f}x "
        f"({'met' if worst_bytes <= 1.05 else 'NOT met'})"
    )
    (args.out / "bench.json").write_text(
        json.dumps({"rows": rows, "merge_mb_s_run": merged_mb / merge_s, "merge_mb_s_standalone": standalone}, indent=1)
    )
    print(f"json: {args.out / 'bench.json'}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
