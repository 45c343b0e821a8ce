"""The expected sub-model: turning merged split-trained weights into a full model for inference.

A documented extension (docs/algorithm.md, "Expected-sub-model inference").
Split training never runs the full model: unit j of a layer only ever sees
the inputs i that shared a window with it, summed with the scaler K/k. With
width-aligned shifting the co-held pairs form a band, so the merged full
model sums many input weights that were never trained with unit j. Like
dropout's weight-scaling rule, the full model should compute the sub-models'
expected pre-activation given j is held:

    W_eff[j, i] = W[j, i] * E[scale_d * 1{i in W_d} | j in W_d]
                = W[j, i] * S[j, i] / C[j]

S[j, i]: sum of the scaler over the slices that held element (j, i);
C[j]: number of slices that held output row j. Both are counted by the
coordinator as slices are merged (numpy, O(model) memory). For FedAvg every
factor is 1, so the full model is unchanged.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.indexing import open_index
from msfusion.algorithm.slicing import Weights
from msfusion.algorithm.spec import IndexArray, ModelSpec
from msfusion.errors import ConfigError


class CoHoldStats:
    """Counts, per scaled weight tensor, how each element was held and scaled.

    Args:
        spec: the model's width groups.
        scaled_tensors: names of the weight tensors of layers with a scaler
            (output rows on axis 0, summed inputs on axis 1).
        decay: multiply the counts by this before each round (1 = all rounds
            count equally; < 1 forgets old plans).
    """

    def __init__(self, spec: ModelSpec, scaled_tensors: list[str], decay: float = 1.0) -> None:
        for name in scaled_tensors:
            if name not in spec.shapes:
                raise ConfigError(f"unknown tensor {name!r}")
        self._spec = spec
        self._decay = decay
        self._scale_sum = {n: np.zeros(spec.shapes[n], np.float64) for n in scaled_tensors}
        self._row_count = {n: np.zeros(spec.shapes[n][0], np.float64) for n in scaled_tensors}

    def new_round(self) -> None:
        """Age the counts (no-op with decay 1)."""
        if self._decay != 1.0:
            for name in self._scale_sum:
                self._scale_sum[name] *= self._decay
                self._row_count[name] *= self._decay

    def add(self, units: Mapping[str, IndexArray], scales: Mapping[str, float]) -> None:
        """Count one slice: the units it held and the scaler of each of its layers."""
        for name, total in self._scale_sum.items():
            index = self._spec.tensor_index(name, units)
            total[open_index(total.shape, index)] += scales[name]
            rows = index.get(0, np.arange(total.shape[0]))
            self._row_count[name][rows] += 1.0

    def expected_weights(self, weights: Mapping[str, npt.NDArray[np.float32]]) -> Weights:
        """The full model that computes the slices' expected pre-activations.

        Rows never held keep their weights (nothing is known about them).
        """
        out: Weights = {name: np.array(value, np.float32, copy=True) for name, value in weights.items()}
        for name, total in self._scale_sum.items():
            count = self._row_count[name]
            held = count > 0
            factor = np.ones_like(total)
            shape = (-1,) + (1,) * (total.ndim - 1)
            factor[held] = (total / np.where(held, count, 1.0).reshape(shape))[held]
            out[name] = (out[name] * factor).astype(np.float32)
        return out

    def state(self) -> dict[str, npt.NDArray[np.float64]]:
        """The counts as named float64 arrays, exactly (checkpointed, so a resumed run deploys the same model)."""
        out: dict[str, npt.NDArray[np.float64]] = {}
        for name in self._scale_sum:
            out[f"scale_sum/{name}"] = self._scale_sum[name].copy()
            out[f"row_count/{name}"] = self._row_count[name].copy()
        return out

    def load_state(self, arrays: Mapping[str, npt.NDArray[np.floating]]) -> None:
        """Restore counts saved by `state` (shapes checked)."""
        for name in self._scale_sum:
            for key, target in ((f"scale_sum/{name}", self._scale_sum), (f"row_count/{name}", self._row_count)):
                if key not in arrays or arrays[key].shape != target[name].shape:
                    raise ConfigError(f"co-hold counts lack {key!r} or have the wrong shape")
                target[name] = np.asarray(arrays[key], np.float64)


def choose_deployable(validation: Mapping[str, Mapping[str, float]]) -> str:
    """The deployable full model: of the merged and the co-hold weighted model, the better on validation data.

    Perplexity (lower) for a language model, else accuracy (higher); a tie,
    or no validation figures, keeps the merged model (docs/algorithm.md,
    "The deployable model"). A window is a sub-model, never deployed as the full model.
    """
    candidates = {k: v for k, v in validation.items() if k in ("merged", "expected")}
    if "merged" not in candidates:
        return "merged"

    def score(metrics: Mapping[str, float]) -> float:
        return -metrics["perplexity"] if "perplexity" in metrics else metrics["accuracy"]

    return max(candidates, key=lambda k: (score(candidates[k]), k == "merged"))
