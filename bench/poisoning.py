"""Poisoning benchmark: one device of eight sends poisoned updates; how much does each merge defence save?

Fashion-MNIST, CNN 32-64-128, 8 devices on a Dirichlet(0.5) split, msfusion
(double shifting, adaptive overlap, MOON), every device affording `--budget`
of the model's parameters, on the reference engine. One device (`--attacker`,
dev003 by default) trains honestly, then returns global + k x (trained -
global) instead of its trained slice: k = -10 ("scaled", the default attack)
or k = -1 ("sign-flip"). Its sample count is its honest one. Rows: no attack;
the attack with no defence; with the update-norm bound rejecting (the
default merge) or clipping at 10x, rejecting at 5x, clipping at 2x; with the
coordinate-wise trimmed mean (0.25); with the median. The figure is the
merged full model's test accuracy after the last round (first `--test` test
images), with the curve at every evaluated round beside it.

At the default budget 1/4 each unit has about 3.9 holders a round, but an
element of a 2-D weight only as many as hold both its units: the table's
header gives the share of held parameters by their number of holders. A
coordinate-wise statistic cannot outvote one attacker on an element with
two holders or fewer (the median of two values is their mean).

The attacker is a bench-side hook around the engine's `local_train`, not a
product option: nothing in msfusion/ or coordinator/ knows it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/poisoning.py            # 8-12 minutes on one core
    OMP_NUM_THREADS=1 .venv/bin/python bench/poisoning.py --attack sign-flip --out bench/results/poisoning-signflip.json
    .venv/bin/python bench/poisoning.py --from-json bench/results/poisoning.json   # re-print

Writes bench/results/poisoning.json (every run, with its curve and what the
merge refused or clipped each round) and bench/results/poisoning.txt (the table).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import numpy.typing as npt
import torch

from msfusion.algorithm.indexing import open_index
from msfusion.algorithm.merging import Aggregate, MergeConfig, NormAction
from msfusion.algorithm.overlap import OverlapConfig, OverlapMode
from msfusion.algorithm.planning import DeviceSlot, PlanConfig, overlap_ratio_for, plan_round
from msfusion.algorithm.spec import ratio_for_budget
from msfusion.coordinator.reference import engine as engine_module
from msfusion.coordinator.reference.engine import ReferenceEngine, TrainedSlice
from msfusion.data.datasets import ArrayDataset
from msfusion.data.idx import load_fashion_mnist
from msfusion.data.partition import dirichlet
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec
from msfusion.recipe import EngineConfig, LocalTrainConfig, device_id

MODEL = ModelConfig(arch="cnn", channels=(32, 64, 128))
N_DEVICES = 8
ATTACKS = {"scaled": -10.0, "sign-flip": -1.0}  # k in global + k x (trained - global)
OFF = MergeConfig(norm_bound=0)
# label -> (attacked?, merge config)
DEFENCES: dict[str, tuple[bool, MergeConfig]] = {
    "no attack": (False, MergeConfig()),
    "attack, no defence": (True, OFF),
    "attack, norm bound 10x reject (default)": (True, MergeConfig()),
    "attack, norm bound 10x clip": (True, MergeConfig(norm_action=NormAction.CLIP)),
    "attack, norm bound 5x reject": (True, MergeConfig(norm_bound=5.0)),
    "attack, norm bound 2x clip": (True, MergeConfig(norm_bound=2.0, norm_action=NormAction.CLIP)),
    "attack, trimmed mean 0.25": (True, replace(OFF, aggregate=Aggregate.TRIMMED_MEAN, trim=0.25)),
    "attack, median": (True, replace(OFF, aggregate=Aggregate.MEDIAN)),
}

Weights = Mapping[str, npt.NDArray[np.float32]]
BOUND = "update norm"  # how the merge's reason for a slice above the norm bound begins


@contextlib.contextmanager
def attacker(shard: ArrayDataset, factor: float) -> Iterator[None]:
    """While open, the device training on `shard` returns global + factor x (its trained update).

    Wraps the reference engine's `local_train` (the engine looks it up at call time); the device's own
    memory (its next round's MOON negative) keeps what it sent, as a real attacker's would.
    """
    honest: Callable[..., TrainedSlice] = engine_module.local_train

    def local_train(*args: Any, **kwargs: Any) -> TrainedSlice:
        result = honest(*args, **kwargs)
        data = kwargs.get("data", args[4] if len(args) > 4 else None)
        if data is not shard:
            return result
        start: Weights = kwargs.get("start", args[2])
        poisoned = {k: (start[k] + factor * (v - start[k])).astype(np.float32) for k, v in result.weights.items()}
        return replace(result, weights=poisoned)

    engine_module.local_train = local_train  # type: ignore[assignment]
    try:
        yield
    finally:
        engine_module.local_train = honest  # type: ignore[assignment]


@functools.lru_cache(maxsize=1)
def _fashion_mnist() -> tuple[ArrayDataset, ArrayDataset]:
    return load_fashion_mnist()  # read once per benchmark process


def load_data(seed: int, test: int) -> tuple[list[ArrayDataset], ArrayDataset]:
    """Dirichlet(0.5) shards of Fashion-MNIST's training set over 8 devices, and the first `test` test images."""
    train, test_set = _fashion_mnist()
    parts = dirichlet(train.y, N_DEVICES, 0.5, np.random.default_rng(seed))
    return [train.subset(p) for p in parts], test_set.subset(np.arange(min(test, len(test_set))))


def engine_config(args: argparse.Namespace, merge: MergeConfig) -> tuple[EngineConfig, float]:
    """msfusion's full method (as bench/scaling.py runs it) at the budget's width, with `merge`."""
    ratio = ratio_for_budget(model_spec(MODEL), float(Fraction(args.budget)))
    natural = overlap_ratio_for(ratio, N_DEVICES)
    adaptive = OverlapConfig(
        mode=OverlapMode.ADAPTIVE, initial=min(0.95, max(0.5, natural)), minimum=min(0.5, natural), maximum=0.95
    )
    cfg = EngineConfig(
        model=MODEL,
        plan=PlanConfig(),
        overlap=adaptive,
        local=LocalTrainConfig(epochs=1, batch_size=32, lr=0.05, max_samples=args.samples),
        loss=LossConfig(variant=ContrastiveVariant.MOON, mu=0.1),
        merge=merge,
        rounds=args.rounds,
        seed=args.seed,
        eval_every=args.eval_every,
    )
    return cfg, ratio


def holder_shares(cfg: EngineConfig, ratio: float, rounds: int = 5) -> dict[str, float]:
    """Share of the held parameters that 1, 2, 3 or more devices hold, over the first rounds' plans.

    Plans at the initial overlap target (the adaptive target moves a little from it). A coordinate-wise
    robust statistic can outvote one attacker only on elements with three holders or more.
    """
    spec = model_spec(cfg.model)
    slots = [DeviceSlot(device_id(i), ratio) for i in range(N_DEVICES)]
    counts = np.zeros(N_DEVICES + 1)
    for round_idx in range(rounds):
        plan = plan_round(spec, slots, round_idx, cfg.overlap.initial, cfg.plan)
        for name, shape in spec.shapes.items():
            holders = np.zeros(shape, np.int64)
            for device in plan.windows:
                holders[open_index(shape, spec.tensor_index(name, plan.units(device)))] += 1
            counts += np.bincount(holders.ravel(), minlength=N_DEVICES + 1)
    held = counts[1:].sum()
    return {
        "1": float(counts[1] / held),
        "2": float(counts[2] / held),
        "3": float(counts[3] / held),
        ">=4": float(counts[4:].sum() / held),
    }


def run_one(args: argparse.Namespace, label: str, attack: str) -> dict[str, Any]:
    """One training; its final accuracy and, per round, what the merge did with the attacker's slice."""
    attacked, merge = DEFENCES[label]
    shards, test = load_data(args.seed, args.test)
    cfg, ratio = engine_config(args, merge)
    engine = ReferenceEngine(cfg, shards, test, [ratio] * N_DEVICES)
    bad = device_id(args.attacker)
    t0 = time.perf_counter()
    with attacker(shards[args.attacker], ATTACKS[attack]) if attacked else contextlib.nullcontext():
        history = engine.run()
    wall = time.perf_counter() - t0
    curve = [(r.round_idx + 1, r.metrics["accuracy"]) for r in history if r.metrics]
    ratios = []  # the attacker's update norm / the median of the honest ones, per round
    honest_spread = []  # the largest honest update norm / their median, per round
    for r in history:
        norms = dict(r.update_norms)
        honest = [v for d, v in norms.items() if d != bad]
        if honest and bad in norms:
            ratios.append(norms[bad] / float(np.median(honest)))
        if honest:
            honest_spread.append(max(honest) / float(np.median(honest)))
    return {
        "label": label,
        "attack": attack if attacked else "none",
        "factor": ATTACKS[attack] if attacked else 1.0,
        "merge": {
            "norm_bound": merge.norm_bound,
            "norm_action": merge.norm_action.value,
            "aggregate": merge.aggregate.value,
            "trim": merge.trim,
        },
        "final": curve[-1][1],
        "curve": curve,
        "attacker_rejected_rounds": sum(1 for r in history if BOUND in r.rejected.get(bad, "")),
        "attacker_clipped_rounds": sum(1 for r in history if bad in r.clipped),
        "honest_rejected": sum(1 for r in history for d, why in r.rejected.items() if d != bad and BOUND in why),
        "honest_clipped": sum(1 for r in history for d in r.clipped if d != bad),
        # rounds in which a slice came back non-finite (the global model diverged)
        "non_finite_rounds": sum(1 for r in history if any("non-finite" in why for why in r.rejected.values())),
        "attacker_norm_over_median": ratios,
        "honest_max_norm_over_median": max(honest_spread) if honest_spread else float("nan"),
        "width_ratio": ratio,
        "holders_per_unit": N_DEVICES * ratio,
        "wall_s": wall,
    }


def table(rows: list[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    """The runs as a plain-text table."""
    evaluated = "/".join(f"r{r}" for r, _ in rows[0]["curve"])
    lines = [
        f"Fashion-MNIST CNN 32-64-128, {N_DEVICES} devices, msfusion, budget {meta['budget']} "
        f"(width {rows[0]['width_ratio']:.3f}, {rows[0]['holders_per_unit']:.1f} holders per unit), "
        f"{meta['rounds']} rounds x {meta['samples']} samples, seed {meta['seed']}, first {meta['test']} test images; "
        f"attacker {device_id(meta['attacker'])} sends global {ATTACKS[meta['attack']]:+g} x (its update)",
        "held parameters by holders (first 5 plans): "
        + ", ".join(f"{k}: {v:.0%}" for k, v in meta.get("holder_shares", {}).items()),
        "",
        f"{'run':40s} {'final acc':>9s} {'acc ' + evaluated:>20s} {'refused':>8s} {'clipped':>8s} "
        f"{'honest hit':>10s} {'NaN rounds':>10s} {'attacker/median':>16s} {'wall s':>7s}",
    ]
    for r in rows:
        ratios = r["attacker_norm_over_median"]
        spread = f"{min(ratios):.1f}-{max(ratios):.1f}" if ratios else ""
        curve = "/".join(f"{a:.3f}" for _, a in r["curve"])
        refused = f"{r['attacker_rejected_rounds']}/{meta['rounds']}"
        clipped = f"{r['attacker_clipped_rounds']}/{meta['rounds']}"
        hit = r["honest_rejected"] + r["honest_clipped"]
        lines.append(
            f"{r['label']:40s} {r['final']:9.4f} {curve:>20s} {refused:>8s} {clipped:>8s} {hit:10d} "
            f"{r['non_finite_rounds']:10d} {spread:>16s} {r['wall_s']:7.0f}"
        )
    clean = [r for r in rows if r["attack"] == "none"]
    if clean:
        lines += [
            "",
            f"no attack: honest update norms at most {clean[0]['honest_max_norm_over_median']:.2f}x the round's median",
        ]
    lines += [
        "refused / clipped: rounds in which the norm bound left out / scaled down the attacker's slice; honest hit: "
        "honest slices refused or clipped by the bound (all rounds); NaN rounds: rounds with a non-finite slice (the "
        "global model diverged); attacker/median: its update norm over the honest slices' median, min-max over the "
        "rounds it sent a finite slice.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/poisoning.json"))
    p.add_argument("--from-json", type=Path, default=None, help="re-print a saved run (and rewrite its .txt)")
    p.add_argument("--attack", choices=sorted(ATTACKS), default="scaled")
    p.add_argument("--budget", default="1/4", help="each device's share of the model's parameters")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--samples", type=int, default=224, help="samples per device per round")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacker", type=int, default=3, help="index of the poisoning device")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        text = table(saved["runs"], saved["meta"])
        print(text)
        args.from_json.with_suffix(".txt").write_text(text + "\n")
        return 0
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("out", "from_json")}
    meta["holder_shares"] = holder_shares(*engine_config(args, MergeConfig()))
    rows = []
    for label in DEFENCES:
        print(f"... {label}", file=sys.stderr, flush=True)
        rows.append(run_one(args, label, args.attack))
        print(f"    final accuracy {rows[-1]['final']:.4f} ({rows[-1]['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    text = table(rows, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
