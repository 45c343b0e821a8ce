"""Predict a device's peak training memory at any width from a few profiled widths (numpy only).

peak(r, B) = overhead + a * params(r) + b * activations(r) * B

- overhead: the runtime, the interpreter, the backend's libraries, the data;
- a: bytes per parameter: weights, gradients, optimizer state, the frozen
  reference copies of the contrastive loss;
- b: bytes per activation element kept for the backward pass (and the
  backend's transient buffers that grow with it).

`params(r)` and `activations(r)` come from `coordinator/fleet/sizing.py` (analytic,
per architecture). The three coefficients are fitted per device by
non-negative least squares on relative error, so a 100 MiB point counts as
much as a 1 GiB one and no coefficient is negative (a negative one would make
the prediction fall as the width grows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from msfusion.coordinator.fleet.sizing import ModelSizes
from msfusion.errors import ConfigError, MemoryBudgetExceeded
from msfusion.wire.protocol import ProfileEntry

RATIO_STEPS = 1024  # ratios are searched as multiples of 1/1024, like spec.ratio_for_budget


@dataclass(frozen=True)
class MemorySample:
    """One profiled configuration: its width, batch size and measured peak."""

    width_ratio: float
    batch_size: int
    peak_bytes: int

    def __post_init__(self) -> None:
        if not 0.0 < self.width_ratio <= 1.0 or self.batch_size < 1 or self.peak_bytes < 1:
            raise ConfigError(f"invalid memory sample {self}: ratio in (0, 1], batch >= 1, peak >= 1")


def samples_from_profile(entries: Iterable[ProfileEntry]) -> list[MemorySample]:
    """The samples of a device's `ProfileReport.entries` (of one backend).

    The peak is the peak RSS plus the GPU's peak where it trained on one: a
    Jetson's GPU allocates from the board's one RAM, which the budget covers.
    """
    return [MemorySample(e.width_ratio, e.batch_size, e.peak_rss_bytes + e.peak_accelerator_bytes) for e in entries]


@dataclass(frozen=True)
class MemoryModel:
    """A fitted memory model of one device training one model.

    Attributes:
        overhead_bytes: memory that does not depend on the width.
        bytes_per_param: memory per parameter of the sub-model.
        bytes_per_activation: memory per activation element per sample.
        sizes: the model's element counts by width ratio.
        max_relative_error: the largest |predicted - measured| / measured over the fitted samples.
    """

    overhead_bytes: float
    bytes_per_param: float
    bytes_per_activation: float
    sizes: ModelSizes
    max_relative_error: float = 0.0

    def predict(self, width_ratio: float, batch_size: int) -> float:
        """Predicted peak bytes when training at `width_ratio` with `batch_size`."""
        params = self.sizes.param_count(width_ratio)
        activations = self.sizes.activation_elements(width_ratio)
        return float(
            self.overhead_bytes + self.bytes_per_param * params + self.bytes_per_activation * activations * batch_size
        )


def _design_row(sizes: ModelSizes, width_ratio: float, batch_size: int) -> list[float]:
    return [1.0, float(sizes.param_count(width_ratio)), float(sizes.activation_elements(width_ratio) * batch_size)]


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """min ||design @ x - target|| subject to x >= 0, exactly, by trying every active set.

    Three unknowns give eight subsets; the best feasible unconstrained solution
    on a subset of the columns (the others at zero) is the constrained optimum.
    """
    n = design.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(target**2))
    for k in range(1, n + 1):
        for columns in itertools.combinations(range(n), k):
            sub = design[:, columns]
            solution, *_ = np.linalg.lstsq(sub, target, rcond=None)
            if np.any(solution < 0):
                continue
            residual = float(np.sum((sub @ solution - target) ** 2))
            if residual < best_residual:
                best = np.zeros(n)
                best[list(columns)] = solution
                best_residual = residual
    return best


def fit_memory_model(
    samples: Sequence[MemorySample], sizes: ModelSizes, overhead_bytes: float | None = None
) -> MemoryModel:
    """Fit overhead, bytes per parameter and bytes per activation to profiled peaks.

    Args:
        samples: at least three profiled configurations, at no fewer than two
            widths; more widths and a second batch size make the fit better posed.
        sizes: the model's element counts by width ratio.
        overhead_bytes: the overhead, if known from elsewhere (the same runtime
            fitted on another model): only the two per-element terms are fitted,
            and two samples at two widths suffice.

    Returns:
        The model, with its largest relative error on the samples.

    Raises:
        ConfigError: too few samples, or samples that cannot separate the terms.
    """
    widths = {s.width_ratio for s in samples}
    fixed = overhead_bytes is not None
    if len(samples) < (2 if fixed else 3) or len(widths) < 2:
        raise ConfigError(
            f"a memory model needs >= {2 if fixed else 3} samples at >= 2 widths, got {len(samples)} at {len(widths)}"
        )
    if overhead_bytes is not None and not 0.0 <= overhead_bytes < min(s.peak_bytes for s in samples):
        raise ConfigError(f"overhead_bytes {overhead_bytes} must be >= 0 and below every sample's peak")
    design = np.array([_design_row(sizes, s.width_ratio, s.batch_size) for s in samples])
    peaks = np.array([float(s.peak_bytes) for s in samples])
    free = design[:, 1:] if fixed else design  # the columns fitted
    target = peaks - (overhead_bytes or 0.0)
    # Columns scaled to unit size and rows divided by the peak: well conditioned,
    # and the fit minimizes the relative error.
    weighted = free / peaks[:, None]
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    if np.linalg.matrix_rank(weighted / scale) < free.shape[1]:
        raise ConfigError(
            "the samples cannot separate the overhead, parameter and activation terms: "
            "profile more widths, or a second batch size"
        )
    fitted = _nonnegative_lstsq(weighted / scale, target / peaks) / scale
    coefficients = np.concatenate([[overhead_bytes], fitted]) if overhead_bytes is not None else fitted
    overhead, per_param, per_activation = (float(c) for c in coefficients)
    errors = np.abs(design @ coefficients - peaks) / peaks
    return MemoryModel(overhead, per_param, per_activation, sizes, float(errors.max()))


def largest_affordable_ratio(
    model: MemoryModel, budget_bytes: int, batch_size: int, safety_margin: float = 0.1
) -> float:
    """The widest ratio whose predicted peak, plus the margin, fits the budget.

    Args:
        model: the device's fitted memory model.
        budget_bytes: the device's memory budget.
        batch_size: the batch size it will train with.
        safety_margin: share of the budget kept free, in [0, 1): the prediction
            must be <= (1 - safety_margin) * budget.

    Returns:
        The widest ratio k/1024 that fits; so it never shrinks as the budget grows.

    Raises:
        ConfigError: a margin outside [0, 1) or a batch size < 1.
        MemoryBudgetExceeded: even the narrowest sub-model does not fit (the numbers say by how much).
    """
    if not 0.0 <= safety_margin < 1.0 or batch_size < 1:
        raise ConfigError(f"safety_margin must be in [0, 1) and batch_size >= 1, got {safety_margin}, {batch_size}")
    allowed = (1.0 - safety_margin) * budget_bytes

    def fits(k: int) -> bool:
        return model.predict(k / RATIO_STEPS, batch_size) <= allowed

    if not fits(1):
        narrowest = model.predict(1 / RATIO_STEPS, batch_size)
        raise MemoryBudgetExceeded(
            f"the narrowest sub-model needs {narrowest / 2**20:.0f} MiB at batch {batch_size}; the budget "
            f"{budget_bytes / 2**20:.0f} MiB less a {safety_margin:.0%} margin allows {allowed / 2**20:.0f} MiB",
            peak_bytes=math.ceil(narrowest),
            budget_bytes=budget_bytes,
        )
    # Not a bisection: the peak is not monotone at the top, since at full width the
    # scaler's private input copies disappear (a full model can need less than 15/16).
    widest = max(k for k in range(1, RATIO_STEPS + 1) if fits(k))
    return widest / RATIO_STEPS
