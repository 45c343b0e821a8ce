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

from msfusion.algorithm.batches import batch_indices, samples_per_epoch
from msfusion.algorithm.indexing import TensorIndex, reslice_previous
from msfusion.algorithm.inference import CoHoldStats, choose_deployable
from msfusion.algorithm.merging import SliceUpdate, merge_slices
from msfusion.algorithm.overlap import next_overlap
from msfusion.algorithm.planning import DeviceSlot, SplitPlan, plan_round
from msfusion.algorithm.slicing import Weights, slice_weights, tensor_indices
from msfusion.algorithm.spec import ModelSpec
from msfusion.data.datasets import ArrayDataset
from msfusion.errors import ConfigError
from msfusion.models.config import LossConfig, ModelConfig
from msfusion.models.evaluate import evaluate
from msfusion.models.objective import build_objective, train_objective
from msfusion.models.registry import (
    build_model,
    flops_per_sample,
    input_scales,
    model_spec,
    state_to_numpy,
)
from msfusion.recipe import EngineConfig, LocalTrainConfig, device_id, device_seed
from msfusion.wire.codec import check_codec, compress_update, encode, roundtrip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedSlice:
    """What the reference engine's local run of one device returns.

    The board's `edge_runtime.trainer.LocalResult` carries the same three
    figures plus its timing and memory measurements, which a reference run has no use for.
    """

    weights: Weights
    n_samples: int
    loss_curve: tuple[float, ...]


@dataclass(frozen=True)
class RoundRecord:
    """Figures of one finished round."""

    round_idx: int
    overlap: float
    disagreement: float
    coverage: float
    merged: tuple[str, ...]
    rejected: Mapping[str, str]  # device -> why its slice was left out (invalid, or above the update-norm bound)
    mean_local_loss: float
    wall_s: float
    variant_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # test figures per variant
    validation_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # ... on validation data
    deployable: str = "merged"  # the variant the run would output now (docs/algorithm.md, "The deployable model")
    clipped: Mapping[str, str] = field(default_factory=dict)  # device -> why its update was scaled to the bound
    update_norms: Mapping[str, float] = field(default_factory=dict)  # RMS of (returned - sent) of each valid slice
    bytes_down: Mapping[str, int] = field(default_factory=dict)  # device -> weights payload sent, in the run's codec
    bytes_up: Mapping[str, int] = field(default_factory=dict)  # device -> slice payload returned

    @property
    def metrics(self) -> Mapping[str, float]:
        """Test figures of the merged full model ({} in a round not evaluated)."""
        return self.variant_metrics.get("merged", {})

    @property
    def window_metrics(self) -> Mapping[str, float]:
        """Test figures of the first device's window as a standalone sub-model (msfusion.md, section 6)."""
        return self.variant_metrics.get("window", {})

    @property
    def expected_metrics(self) -> Mapping[str, float]:
        """Test figures of the co-hold weighted full model."""
        return self.variant_metrics.get("expected", {})


def local_train(
    model_cfg: ModelConfig,
    widths: Mapping[str, int],
    start: Mapping[str, npt.NDArray[np.float32]],
    previous: Mapping[str, npt.NDArray[np.float32]] | None,
    data: ArrayDataset,
    train_cfg: LocalTrainConfig,
    loss_cfg: LossConfig,
    seed: int,
    device: torch.device | None = None,
) -> TrainedSlice:
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
        device: where to train (default CPU); the result is on the CPU.

    Returns:
        Trained weights, samples per epoch trained, and the per-step losses.
    """
    torch.manual_seed(seed)
    objective = build_objective(model_cfg, widths, loss_cfg, start, start, previous)
    if device is not None and device.type != "cpu":
        objective.to(device)
    x_all = torch.from_numpy(data.x).to(device or "cpu")
    y_all = torch.from_numpy(data.y).to(device or "cpu")
    order = batch_indices(len(data), train_cfg.batch_size, train_cfg.epochs, seed, train_cfg.max_samples)
    batches = ((x_all[index], y_all[index]) for index in (torch.from_numpy(i).to(x_all.device) for i in order))
    losses = train_objective(objective, batches, train_cfg.optimizer, train_cfg.lr)
    n_samples = samples_per_epoch(len(data), train_cfg.batch_size, train_cfg.max_samples)
    return TrainedSlice(state_to_numpy(objective.model), n_samples, tuple(losses))


@dataclass
class DeviceMemory:
    """What a simulated device keeps between rounds: its last trained slice."""

    weights: Weights | None = None
    index: dict[str, TensorIndex] | None = None
    residual: Weights | None = None  # int8 transfers: what rounding took from its last update (error feedback)


class ReferenceEngine:
    """Runs a federated training in one process with any strategy.

    Args:
        config: the run's configuration.
        shards: one local data set per device, in ring order.
        test: held-out data for evaluation.
        max_ratios: per device, the largest width ratio it affords.
        initial: optional starting global weights (default: seeded init).
        validation: held out of training and of the test set; chooses the
            deployable variant (None: the merged model is deployed).
        device: torch device for local training and evaluation ("cpu", "cuda").
    """

    def __init__(
        self,
        config: EngineConfig,
        shards: Sequence[ArrayDataset],
        test: ArrayDataset,
        max_ratios: Sequence[float],
        initial: Mapping[str, npt.NDArray[np.float32]] | None = None,
        validation: ArrayDataset | None = None,
        device: str = "cpu",
    ) -> None:
        if len(shards) != len(max_ratios):
            raise ConfigError(f"{len(shards)} shards but {len(max_ratios)} device ratios")
        self.config = config
        self.spec: ModelSpec = model_spec(config.model)
        self.shards = list(shards)
        self.test = test
        self.validation = validation
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
        self.devices = [DeviceSlot(device_id(i), r) for i, r in enumerate(max_ratios)]
        self.weights: Weights = (
            {n: np.array(a, np.float32) for n, a in initial.items()}
            if initial is not None
            else state_to_numpy(build_model(config.model, seed=config.seed))
        )
        self.memory = {d.device_id: DeviceMemory() for d in self.devices}
        self.overlap = config.overlap.initial
        self.disagreement: float | None = None
        self.history: list[RoundRecord] = []
        self.cohold = CoHoldStats(self.spec, list(input_scales(config.model, None)))

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
        codec = check_codec(self.config.codec)
        bytes_down: dict[str, int] = {}
        bytes_up: dict[str, int] = {}
        for index, device in enumerate(self.devices):
            units = plan.units(device.device_id)
            start = slice_weights(self.weights, self.spec, units)  # (K, ...) -> (k, ...)
            index_now = tensor_indices(self.spec, units)
            memory = self.memory[device.device_id]
            received = start if codec == "fp32" else roundtrip(start, codec)  # what the device gets
            bytes_down[device.device_id] = len(encode(start, codec))
            previous = reslice_previous(received, index_now, memory.weights, memory.index)
            result = local_train(
                self.config.model,
                plan.widths(device.device_id),
                received,
                previous,
                self.shards[index],
                self.config.local,
                self.config.loss,
                device_seed(self.config.seed, round_idx, index),
                device=self.device,
            )
            returned = result.weights
            if codec != "fp32":  # the update goes up, rounded; the coordinator adds it to the exact sub-model
                delta = {n: result.weights[n] - received[n] for n in start}
                residual = None
                if memory.residual is not None:
                    zeros = {n: np.zeros_like(a) for n, a in start.items()}
                    residual = reslice_previous(zeros, index_now, memory.residual, memory.index)
                sent, memory.residual = compress_update(delta, codec, residual)
                bytes_up[device.device_id] = len(encode(delta, codec, update=True))
                returned = {n: start[n] + sent[n] for n in start}
            else:
                bytes_up[device.device_id] = len(encode(result.weights, codec))
            memory.weights, memory.index = result.weights, index_now
            updates.append(SliceUpdate(device.device_id, round_idx, units, returned, result.n_samples))
            local_losses.extend(result.loss_curve)
        self.weights, report = merge_slices(self.weights, self.spec, updates, round_idx, self.config.merge)
        for update in updates:  # what the merged slices held (the fleet counts the same)
            if update.device_id in report.merged:
                self.cohold.add(update.units, input_scales(self.config.model, plan.widths(update.device_id)))
        self.disagreement = report.disagreement
        evaluated = (round_idx + 1) % self.config.eval_every == 0 or round_idx + 1 >= self.config.rounds
        variants = self.variants(plan) if evaluated else {}
        scored = {name: self._evaluate(w, self.test, widths) for name, (w, widths) in variants.items()}
        checked = {}
        if self.validation is not None:
            checked = {name: self._evaluate(w, self.validation, widths) for name, (w, widths) in variants.items()}
        record = RoundRecord(
            round_idx=round_idx,
            overlap=plan.overlap,
            disagreement=report.disagreement,
            coverage=report.coverage,
            merged=report.merged,
            rejected=dict(report.rejected),
            mean_local_loss=float(np.mean(local_losses)) if local_losses else float("nan"),
            wall_s=time.perf_counter() - t0,
            variant_metrics=scored,
            validation_metrics=checked,
            deployable=choose_deployable(checked),
            clipped=dict(report.clipped),
            update_norms=dict(report.update_norms),
            bytes_down=bytes_down,
            bytes_up=bytes_up,
        )
        self.history.append(record)
        log.info(
            "round %d: %s overlap %.3f disagreement %.3f", round_idx, record.metrics, plan.overlap, report.disagreement
        )
        return record

    def variants(self, plan: SplitPlan) -> dict[str, tuple[Weights, dict[str, int] | None]]:
        """The models a round can be scored as: merged full model, co-hold weighted full model, one window."""
        out: dict[str, tuple[Weights, dict[str, int] | None]] = {"merged": (self.weights, None)}
        if self.config.eval_expected or self.validation is not None:  # a candidate for the deployable model
            out["expected"] = (self.cohold.expected_weights(self.weights), None)
        if self.config.eval_window:
            first = self.devices[0].device_id
            out["window"] = (slice_weights(self.weights, self.spec, plan.units(first)), plan.widths(first))
        return out

    def deployable_weights(self) -> tuple[str, Weights]:
        """The full model the run outputs: the variant chosen on validation data at the last evaluated round."""
        chosen = next((r.deployable for r in reversed(self.history) if r.validation_metrics), "merged")
        if chosen == "expected":
            return chosen, self.cohold.expected_weights(self.weights)
        return "merged", self.weights

    def _evaluate(self, weights: Weights, data: ArrayDataset, widths: Mapping[str, int] | None) -> dict[str, float]:
        return evaluate(self.config.model, weights, data, self.config.eval_batch_size, widths, device=self.device)

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
