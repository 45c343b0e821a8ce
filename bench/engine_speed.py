"""Reference-engine speed: device-samples trained per second, per engine option, side by side in one run.

    .venv/bin/python bench/engine_speed.py [--devices 8] [--rounds 4] [--samples 64] [--threads 1]

Options compared (the same seeds, data and plan; only the engine changes):
- `eval every round, traced norms`: the engine as it was (elementwise GroupNorm in eager torch,
  merged + co-hold + window evaluated on test and validation every round);
- `eval every round`: eager torch's native norms (`msfusion.models.layers.traceable_norms` is
  only entered by the exporters);
- `eval every 10`: evaluation only every 10th and the last round (`EngineConfig.eval_every`);
- `no evaluation variants`: only the merged model is scored;
- `cuda`: the same on a GPU, when torch sees one.
The figure is device-samples per second of the whole run (training, slicing, merging and
evaluation), so it is what a scaling benchmark's wall time follows.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from msfusion.coordinator.reference.engine import ReferenceEngine
from msfusion.data.idx import load_fashion_mnist
from msfusion.data.partition import dirichlet
from msfusion.models import layers
from msfusion.models.config import ModelConfig
from msfusion.recipe import EngineConfig, LocalTrainConfig


@contextlib.contextmanager
def traced_norms(on: bool) -> Iterator[None]:
    if on:
        with layers.traceable_norms():
            yield
    else:
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--samples", type=int, default=64, help="samples per device per round")
    p.add_argument("--ratio", type=float, default=0.25, help="every device's width ratio")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist()
    rng = np.random.default_rng(0)
    shards = [train.subset(part) for part in dirichlet(train.y[:50_000], args.devices, 0.5, rng)]
    val, test = train.subset(np.arange(50_000, 51_000)), test.subset(np.arange(1000))
    base = EngineConfig(
        model=ModelConfig(arch="cnn", channels=(32, 64, 128)),
        local=LocalTrainConfig(max_samples=args.samples),
        rounds=args.rounds,
        eval_window=True,
        eval_expected=True,
    )
    options = [
        ("eval every round, traced norms", base, "cpu", True),
        ("eval every round", base, "cpu", False),
        ("eval every 10", replace(base, eval_every=10), "cpu", False),
        ("no evaluation variants", replace(base, eval_every=10, eval_window=False, eval_expected=False), "cpu", False),
    ]
    if torch.cuda.is_available():
        options.append(("cuda, eval every 10", replace(base, eval_every=10), "cuda", False))
    print(
        f"{args.devices} devices x {args.samples} samples x {args.rounds} rounds, CNN 32-64-128 at ratio {args.ratio}"
    )
    print(f"{'option':34s} {'wall s':>8s} {'device-samples/s':>17s} {'vs first':>9s}")
    first = None
    weights = []
    for name, cfg, device, traced in options:
        engine = ReferenceEngine(cfg, shards, test, [args.ratio] * args.devices, validation=val, device=device)
        start = time.perf_counter()
        with traced_norms(traced):
            engine.run()
        wall = time.perf_counter() - start
        rate = args.devices * args.samples * args.rounds / wall
        first = first or rate
        weights.append(engine.weights)
        print(f"{name:34s} {wall:8.1f} {rate:17.0f} {rate / first:8.2f}x", flush=True)
    # Every option trains the same global model (native and traced norms agree to float rounding).
    diff = max(float(np.max(np.abs(w[n] - weights[0][n]))) for w in weights[1:] for n in w)
    print(f"largest difference of the final global weights across options: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
