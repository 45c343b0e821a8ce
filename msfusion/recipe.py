"""A training run's recipe: what the reference engine and the fleet both run, as plain data (no torch).

`EngineConfig` is one federated training (model, plan, overlap, local
training, objective, merge, rounds, seed); `device_seed` the seed of one device's
local run in one round, the same on every engine. The run file's `[engine]`
table parses into exactly these classes (`coordinator/fleet/config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from msfusion.algorithm.merging import MergeConfig
from msfusion.algorithm.overlap import OverlapConfig
from msfusion.algorithm.planning import PlanConfig, Strategy
from msfusion.errors import ConfigError
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.wire.artifacts import OptimizerConfig

# The default objective of a run (an identity, so a run that never set `loss` can be told apart):
# MSfusion's full method, the MOON term at mu 0.1 (msfusion.md, section 5).
_METHOD_LOSS = LossConfig()

__all__ = [
    "EngineConfig",
    "LocalTrainConfig",
    "LossConfig",
    "MergeConfig",
    "OptimizerConfig",
    "device_id",
    "device_seed",
]


@dataclass(frozen=True)
class LocalTrainConfig:
    """Local training on a device.

    Attributes:
        epochs: local epochs E per round.
        batch_size: samples per step.
        lr: learning rate.
        optimizer: the optimizer (SGD with momentum, or AdamW) and its knobs,
            exactly what an exported artifact implements.
        max_samples: cap on samples per epoch (0 = the whole shard).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    max_samples: int = 1000

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size must be >= 1 and lr > 0")
        if self.max_samples < 0:
            raise ConfigError(f"max_samples must be >= 0, got {self.max_samples}")


@dataclass(frozen=True)
class EngineConfig:
    """One federated training run.

    Attributes:
        model: the global model's architecture.
        plan: strategy and shift knobs.
        overlap: overlap target knobs (msfusion).
        local: local training knobs.
        loss: contrastive term knobs; left at its default, MOON at mu 0.1 for msfusion (the
            full method) and plain cross-entropy for the baselines.
        merge: how each round's slices are merged and the defences against poisoned ones (the run
            file's `[engine.merge]`; default: the sample-weighted mean with the 10x update-norm bound).
        rounds: number of rounds.
        seed: seeds the global model's initialization and every local run.
        eval_batch_size: batch size for evaluation.
        eval_window: also evaluate the first device's window as a standalone model.
        eval_expected: also evaluate the expected-sub-model full model
            (msfusion/algorithm/inference.py).
        eval_every: evaluate every this many rounds, and always the last one.
        codec: how weights travel (msfusion/wire/codec.py): "fp32" (as they are), "fp16", or
            "int8" (per-channel scale, the update up with error feedback on the device).
    """

    model: ModelConfig
    plan: PlanConfig = field(default_factory=PlanConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    loss: LossConfig = field(default_factory=lambda: _METHOD_LOSS)
    merge: MergeConfig = field(default_factory=MergeConfig)
    rounds: int = 10
    seed: int = 0
    eval_batch_size: int = 500
    eval_window: bool = False
    eval_expected: bool = False
    eval_every: int = 1
    codec: str = "fp32"

    def __post_init__(self) -> None:
        if self.codec not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"codec must be 'fp32', 'fp16' or 'int8', got {self.codec!r}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1 (a run of no rounds trains nothing), got {self.rounds}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.loss is _METHOD_LOSS and self.plan.strategy is not Strategy.MSFUSION:
            # Left at its default, the objective is the strategy's own: MSfusion's contrastive term is
            # part of MSfusion, and a baseline trains as its paper does, on cross-entropy.
            object.__setattr__(self, "loss", LossConfig(ContrastiveVariant.OFF))


def device_seed(run_seed: int, round_idx: int, device_index: int) -> int:
    """The seed of one device's local run in one round (same on every engine)."""
    return int(np.random.SeedSequence([run_seed, round_idx, device_index]).generate_state(1)[0])


def device_id(index: int) -> str:
    """The id of the index-th simulated device: dev000, dev001, ... (both engines plan in this order)."""
    return f"dev{index:03d}"
