"""What every exporter and the validator agree on about a sub-model's objective, beyond the module itself.

The module is `msfusion.models.objective.build_objective` (the reference
engine's own `LocalObjective`); here are the static batch an artifact trains
on, random data and weights shaped like the real ones, and the loss knobs
that shape a graph (part of the artifact cache's key).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.slicing import Weights
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import build_model, state_to_numpy
from msfusion.wire.artifacts import TensorInfo

Batch = tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]


def loss_signature(loss: LossConfig) -> dict[str, object]:
    """The loss knobs that shape the graph; every inactive term collapses to plain cross-entropy."""
    if not loss.active:
        return {"variant": ContrastiveVariant.OFF.value, "mu": 0.0, "tau": 0.0}
    return {"variant": loss.variant.value, "mu": float(loss.mu), "tau": float(loss.tau)}


def batch_inputs(model_cfg: ModelConfig, batch_size: int) -> tuple[TensorInfo, TensorInfo]:
    """The static (x, y) an artifact of `model_cfg` trains on (docs/design.md, Models)."""
    if model_cfg.task == "lm":
        shape = (batch_size, model_cfg.context)
        return TensorInfo("x", shape, "int64"), TensorInfo("y", shape, "int64")
    x_shape = (batch_size, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    return TensorInfo("x", x_shape, "float32"), TensorInfo("y", (batch_size,), "int64")


def random_batch(model_cfg: ModelConfig, batch_size: int, rng: np.random.Generator) -> Batch:
    """A random batch shaped like real data (normalized images, or character ids)."""
    x_info, y_info = batch_inputs(model_cfg, batch_size)
    classes = model_cfg.vocab_size if model_cfg.task == "lm" else model_cfg.num_classes
    if model_cfg.task == "lm":
        x: npt.NDArray[np.generic] = rng.integers(0, model_cfg.vocab_size, x_info.shape, dtype=np.int64)
    else:
        x = rng.standard_normal(x_info.shape).astype(np.float32)
    return x, rng.integers(0, classes, y_info.shape, dtype=np.int64)


def random_weights(model_cfg: ModelConfig, widths: Mapping[str, int], seed: int) -> Weights:
    """The initial weights `build_model` draws for the sub-model at `widths` from `seed`."""
    return state_to_numpy(build_model(model_cfg, widths, seed=seed))
