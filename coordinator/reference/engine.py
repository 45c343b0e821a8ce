"""The in-process reference engine: whole federated trainings in plain PyTorch, no MQTT.

It is the fast path for algorithm experiments and the yardstick every other
engine is checked against: the fleet over MQTT must reproduce its global
model from the same seeds and data. One round reads top to bottom: plan,
slice, train every device locally, merge, evaluate, adapt the overlap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch

from msfusion.data.datasets import ArrayDataset
from msfusion.algorithm.inference import CoHoldStats
from msfusion.models.objective import ContrastiveVariant, LocalObjective, cross_entropy
from msfusion.algorithm.merging import MergeReport, SliceUpdate, merge_slices
from msfusion.models.registry import ModelConfig, build_model, flops_per_sample, load_numpy, model_spec, scale_gradients, scaled_parameters, state_to_numpy
from msfusion.algorithm.overlap import OverlapConfig, next_overlap
from msfusion.algorithm.planning import DeviceSlot, PlanConfig, SplitPlan, plan_round
from msfusion.algorithm.slicing import Weights, slice_weights, tensor_indices
from msfusion.algorithm.spec import ModelSpec
from msfusion.algorithm.batches import batch_indices, samples_per_epoch
from msfusion.algorithm.indexing import TensorIndex, reslice_previous
from msfusion.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainConfig:
    """Local training on a device.

    Attributes:
        epochs: local epochs E per round.
        batch_size: samples per step.
        lr: learning rate.
        optimizer: "sgd" (with momentum) or "adamw".
        momentum: SGD momentum.
        weight_decay: AdamW / SGD weight decay.
        max_samples: cap on samples per epoch (0 = the whole shard).
        scaler_compensation: SGD: multiply scaled layers' weight gradients by
            1/s (`SplitModel.gradient_scales`), so a sub-model trains at the
            learning rate of the small model it is.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_samples: int = 1000
    scaler_compensation: bool = True

    @property
    def compensates(self) -> bool:
        """Whether scaled weights' gradients are multiplied by 1/s (SGD with compensation on)."""
        return self.optimizer == "sgd" and self.scaler_compensation

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size must be >= 1 and lr > 0")


@dataclass(frozen=True)
class LossConfig:
    """The local objective's contrastive term (msfusion.md, section 5)."""

    variant: ContrastiveVariant = ContrastiveVariant.OFF
    mu: float = 0.1
    tau: float = 0.5

    @property
    def active(self) -> bool:
        """Whether the contrastive term is on."""
        return self.variant is not ContrastiveVariant.OFF and self.mu > 0


@dataclass(frozen=True)
class EngineConfig:
    """One federated training run.

    Attributes:
        model: the global model's architecture.
        plan: strategy and shift knobs.
        overlap: overlap target knobs (msfusion).
        local: local training knobs.
        loss: contrastive term knobs.
        rounds: number of rounds.
        seed: seeds the global model's initialization and every local run.
        eval_batch_size: batch size for evaluation.
        eval_window: also evaluate the first device's window as a standalone model.
        eval_expected: also evaluate the expected-sub-model full model
            (msfusion/algorithm/inference.py).
    """

    model: ModelConfig
    plan: PlanConfig = field(default_factory=PlanConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rounds: int = 10
    seed: int = 0
    eval_batch_size: int = 500
    eval_window: bool = False
    eval_expected: bool = False


@dataclass(frozen=True)
class LocalResult:
    """What one device's local training returns."""

    weights: Weights
    n_samples: int
    loss_curve: tuple[float, ...]


@dataclass(frozen=True)
class RoundRecord:
    """Figures of one finished round."""

    round_idx: int
    overlap: float
    metrics: Mapping[str, float]
    window_metrics: Mapping[str, float]
    expected_metrics: Mapping[str, float]
    disagreement: float
    coverage: float
    merged: tuple[str, ...]
    rejected: Mapping[str, str]
    mean_local_loss: float
    wall_s: float


def device_seed(run_seed: int, round_idx: int, device_index: int) -> int:
    """The seed of one device's local run in one round (same on every engine)."""
    return int(np.random.SeedSequence([run_seed, round_idx, device_index]).generate_state(1)[0])


def make_optimizer(params: list[torch.nn.Parameter], cfg: LocalTrainConfig) -> torch.optim.Optimizer:
    """The local optimizer the exported artifacts implement too."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_train(
    model_cfg: ModelConfig,
    widths: Mapping[str, int],
    start: Mapping[str, npt.NDArray[np.float32]],
    previous: Mapping[str, npt.NDArray[np.float32]] | None,
    data: ArrayDataset,
    train_cfg: LocalTrainConfig,
    loss_cfg: LossConfig,
    seed: int,
) -> LocalResult:
    """Train one sub-model locally, as a device would (the PyTorch reference).

    Args:
        model_cfg: architecture.
        widths: units per group of the sub-model.
        start: the global sub-model weights received this round (also the
            frozen global reference of the contrastive term).
        previous: the previous local sub-model re-sliced to this round's units
            (MOON's negative); None uses `start`.
        data: the device's local shard.
        train_cfg: local training knobs.
        loss_cfg: contrastive term knobs.
        seed: the batch-order seed.

    Returns:
        Trained weights, samples per epoch trained, and the per-step losses.
    """
    torch.manual_seed(seed)
    model = build_model(model_cfg, widths)
    load_numpy(model, start)
    global_ref = prev_ref = None
    if loss_cfg.active:
        global_ref = build_model(model_cfg, widths)
        load_numpy(global_ref, start)
        if loss_cfg.variant is ContrastiveVariant.MOON:
            prev_ref = build_model(model_cfg, widths)
            load_numpy(prev_ref, previous if previous is not None else start)
    objective = LocalObjective(model, global_ref, prev_ref, loss_cfg.mu, loss_cfg.tau, loss_cfg.variant)
    objective.train()
    optimizer = make_optimizer(list(model.parameters()), train_cfg)
    compensated = scaled_parameters(model, model.gradient_scales() if train_cfg.compensates else {})
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    losses: list[float] = []
    for idx in batch_indices(len(data), train_cfg.batch_size, train_cfg.epochs, seed, train_cfg.max_samples):
        index = torch.from_numpy(idx)
        loss = objective(x_all[index], y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        scale_gradients(compensated)
        optimizer.step()
        losses.append(float(loss.detach()))
    n_samples = samples_per_epoch(len(data), train_cfg.batch_size, train_cfg.max_samples)
    return LocalResult(state_to_numpy(model), n_samples, tuple(losses))


@torch.no_grad()
def evaluate(
    model_cfg: ModelConfig,
    weights: Mapping[str, npt.NDArray[np.float32]],
    data: ArrayDataset,
    batch_size: int = 500,
    widths: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Test figures of a model: loss and accuracy (classification) or perplexity (LM)."""
    model = build_model(model_cfg, widths)
    load_numpy(model, weights)
    model.eval()
    total_loss = 0.0
    correct = 0
    count = 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size])
        y = torch.from_numpy(data.y[start : start + batch_size])
        logits, _ = model(x)
        n = int(y.numel())
        total_loss += float(cross_entropy(logits, y)) * n
        correct += int((logits.argmax(-1) == y).sum())
        count += n
    loss = total_loss / max(count, 1)
    if model_cfg.task == "lm":
        return {"loss": loss, "perplexity": float(np.exp(loss)), "accuracy": correct / max(count, 1)}
    return {"loss": loss, "accuracy": correct / max(count, 1)}


@dataclass
class DeviceMemory:
    """What a simulated device keeps between rounds: its last trained slice."""

    weights: Weights | None = None
    index: dict[str, TensorIndex] | None = None


class ReferenceEngine:
    """Runs a federated training in one process with any strategy.

    Args:
        config: the run's configuration.
        shards: one local data set per device, in ring order.
        test: held-out data for evaluation.
        max_ratios: per device, the largest width ratio it affords.
        initial: optional starting global weights (default: seeded init).
    """

    def __init__(
        self,
        config: EngineConfig,
        shards: Sequence[ArrayDataset],
        test: ArrayDataset,
        max_ratios: Sequence[float],
        initial: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        if len(shards) != len(max_ratios):
            raise ConfigError(f"{len(shards)} shards but {len(max_ratios)} device ratios")
        self.config = config
        self.spec: ModelSpec = model_spec(config.model)
        self.shards = list(shards)
        self.test = test
        self.devices = [DeviceSlot(f"dev{i:03d}", r) for i, r in enumerate(max_ratios)]
        self.weights: Weights = (
            {n: np.array(a, np.float32) for n, a in initial.items()}
            if initial is not None
            else state_to_numpy(build_model(config.model, seed=config.seed))
        )
        self.memory = {d.device_id: DeviceMemory() for d in self.devices}
        self.overlap = config.overlap.initial
        self.disagreement: float | None = None
        self.history: list[RoundRecord] = []
        full = build_model(config.model)
        self._scaled = [f"{name}.weight" for name in full.input_scales()]
        self._scales: dict[tuple[tuple[str, int], ...], dict[str, float]] = {}
        self.cohold = CoHoldStats(self.spec, self._scaled)

    def scales(self, widths: Mapping[str, int]) -> dict[str, float]:
        """The scaler of every scaled layer of the sub-model at `widths`, by weight name."""
        key = tuple(sorted(widths.items()))
        if key not in self._scales:
            model = build_model(self.config.model, widths)
            self._scales[key] = {f"{n}.weight": s for n, s in model.input_scales().items()}
        return self._scales[key]

    def plan(self, round_idx: int) -> SplitPlan:
        """Round `round_idx`'s plan (also adapts the overlap target)."""
        self.overlap = next_overlap(self.config.overlap, round_idx, self.overlap, self.disagreement)
        return plan_round(self.spec, self.devices, round_idx, self.overlap, self.config.plan)

    def run_round(self, round_idx: int) -> RoundRecord:
        """Plan, slice, train every device, merge, evaluate, adapt."""
        t0 = time.perf_counter()
        plan = self.plan(round_idx)
        updates: list[SliceUpdate] = []
        local_losses: list[float] = []
        for index, device in enumerate(self.devices):
            units = plan.units(device.device_id)
            start = slice_weights(self.weights, self.spec, units)  # (K, ...) -> (k, ...)
            index_now = tensor_indices(self.spec, units)
            memory = self.memory[device.device_id]
            previous = reslice_previous(start, index_now, memory.weights, memory.index)
            result = local_train(
                self.config.model,
                plan.widths(device.device_id),
                start,
                previous,
                self.shards[index],
                self.config.local,
                self.config.loss,
                device_seed(self.config.seed, round_idx, index),
            )
            memory.weights, memory.index = result.weights, index_now
            updates.append(SliceUpdate(device.device_id, round_idx, units, result.weights, result.n_samples))
            self.cohold.add(units, self.scales(plan.widths(device.device_id)))
            local_losses.extend(result.loss_curve)
        self.weights, report = merge_slices(self.weights, self.spec, updates, round_idx)
        self.disagreement = report.disagreement
        metrics = evaluate(self.config.model, self.weights, self.test, self.config.eval_batch_size)
        window = self.evaluate_window(plan) if self.config.eval_window else {}
        expected = (
            evaluate(self.config.model, self.cohold.expected_weights(self.weights), self.test, self.config.eval_batch_size)
            if self.config.eval_expected
            else {}
        )
        record = self._record(
            round_idx, plan, report, metrics, window, expected, local_losses, time.perf_counter() - t0
        )
        self.history.append(record)
        log.info("round %d: %s overlap %.3f disagreement %.3f", round_idx, metrics, plan.overlap, report.disagreement)
        return record

    def evaluate_window(self, plan: SplitPlan) -> dict[str, float]:
        """The second figure (msfusion.md, section 6): the first device's window of the
        merged model, as a standalone sub-model with its scaler."""
        first = self.devices[0].device_id
        units = plan.units(first)
        sub = slice_weights(self.weights, self.spec, units)
        return evaluate(self.config.model, sub, self.test, self.config.eval_batch_size, plan.widths(first))

    def _record(
        self,
        round_idx: int,
        plan: SplitPlan,
        report: MergeReport,
        metrics: Mapping[str, float],
        window_metrics: Mapping[str, float],
        expected_metrics: Mapping[str, float],
        local_losses: Sequence[float],
        wall_s: float,
    ) -> RoundRecord:
        return RoundRecord(
            round_idx=round_idx,
            overlap=plan.overlap,
            metrics=dict(metrics),
            window_metrics=dict(window_metrics),
            expected_metrics=dict(expected_metrics),
            disagreement=report.disagreement,
            coverage=report.coverage,
            merged=report.merged,
            rejected=dict(report.rejected),
            mean_local_loss=float(np.mean(local_losses)) if local_losses else float("nan"),
            wall_s=wall_s,
        )

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        """All rounds; `on_round` is called after each."""
        for round_idx in range(len(self.history), self.config.rounds):
            record = self.run_round(round_idx)
            if on_round is not None:
                on_round(record)
        return self.history


@dataclass(frozen=True)
class DeviceCost:
    """Per-device cost of one round under a plan."""

    params: int
    flops_per_sample: int
    bytes_per_round: int  # weights down + trained slice up, fp32


def device_cost(model_cfg: ModelConfig, widths: Mapping[str, int]) -> DeviceCost:
    """Parameters, forward MACs per sample and fp32 bytes moved per round for one sub-model."""
    spec = model_spec(model_cfg)
    params = spec.param_count(widths)
    return DeviceCost(params=params, flops_per_sample=flops_per_sample(model_cfg, widths), bytes_per_round=8 * params)
