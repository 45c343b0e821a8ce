"""Overlap-aware merging of returned weight slices (msfusion.md, section 4; numpy, torch-free).

Every element's new value is the sample-weighted average of the values
returned by the devices that held it; elements no device held keep their
value. The accumulator streams: memory is O(model) whatever the number of
devices, and a rejected slice touches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.indexing import open_index
from msfusion.algorithm.slicing import Weights
from msfusion.algorithm.spec import IndexArray, ModelSpec
from msfusion.errors import InvalidSlice


@dataclass(frozen=True)
class SliceUpdate:
    """One device's trained slice, as the merge sees it.

    Attributes:
        device_id: who trained it.
        round_idx: the round it was trained for.
        units: unit indices per group it held (as planned).
        weights: the trained sub-model weights.
        n_samples: local samples trained on (the merge weight).
    """

    device_id: str
    round_idx: int
    units: Mapping[str, IndexArray]
    weights: Mapping[str, npt.NDArray[np.float32]]
    n_samples: int


@dataclass(frozen=True)
class MergeReport:
    """What a merge did.

    Attributes:
        merged: device ids whose slices were merged.
        rejected: device id -> reason, for slices that were refused.
        disagreement: on elements held by two or more devices, the share of
            the holders' update energy that is spread between them:
            sum(weighted variance) / sum(weighted mean square of (value - old)).
            0 = all holders agree, 1 = their updates cancel out.
        coverage: share of the model's elements that at least one device held.
    """

    merged: tuple[str, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)
    disagreement: float = 0.0
    coverage: float = 0.0


class MergeAccumulator:
    """Streaming, sample-weighted, overlap-aware average of slices into the global model."""

    def __init__(self, global_w: Mapping[str, npt.NDArray[np.float32]], spec: ModelSpec, round_idx: int) -> None:
        self._spec = spec
        self._round = round_idx
        self._old = {name: np.asarray(global_w[name], dtype=np.float32) for name in spec.shapes}
        self._sum = {n: np.zeros(a.shape, np.float64) for n, a in self._old.items()}
        self._sq = {n: np.zeros(a.shape, np.float64) for n, a in self._old.items()}
        self._wsum = {n: np.zeros(a.shape, np.float64) for n, a in self._old.items()}
        self._holders = {n: np.zeros(a.shape, np.int32) for n, a in self._old.items()}
        self._merged: list[str] = []
        self._rejected: dict[str, str] = {}

    def _validate(self, update: SliceUpdate) -> dict[str, tuple[IndexArray, ...]]:
        if update.round_idx != self._round:
            raise InvalidSlice(f"slice is for round {update.round_idx}, merging round {self._round}")
        if update.device_id in self._merged:
            raise InvalidSlice(f"duplicate slice from {update.device_id} in round {self._round}")
        if update.n_samples <= 0:
            raise InvalidSlice(f"n_samples must be > 0, got {update.n_samples}")
        missing = set(self._spec.shapes) - set(update.weights)
        extra = set(update.weights) - set(self._spec.shapes)
        if missing or extra:
            raise InvalidSlice(f"tensor names differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        widths = {g: len(u) for g, u in update.units.items()}
        positions: dict[str, tuple[IndexArray, ...]] = {}
        for name in self._spec.shapes:
            arr = update.weights[name]
            expected = self._spec.sub_shape(name, widths)
            if tuple(arr.shape) != expected:
                raise InvalidSlice(f"{name}: shape {tuple(arr.shape)}, expected {expected}")
            if not np.all(np.isfinite(arr)):
                raise InvalidSlice(f"{name}: non-finite values")
            positions[name] = open_index(self._spec.shapes[name], self._spec.tensor_index(name, update.units))
        return positions

    def add(self, update: SliceUpdate) -> None:
        """Fold one slice in; a slice that fails validation changes nothing.

        Raises:
            InvalidSlice: wrong round, duplicate device, wrong names or shapes,
                non-finite values, or no samples. The reason is also kept in
                the report.
        """
        try:
            positions = self._validate(update)
        except InvalidSlice as exc:
            self._rejected[update.device_id] = str(exc)
            raise
        weight = float(update.n_samples)
        for name, pos in positions.items():
            values = np.asarray(update.weights[name], dtype=np.float64)
            self._sum[name][pos] += weight * values
            self._sq[name][pos] += weight * values * values
            self._wsum[name][pos] += weight
            self._holders[name][pos] += 1
        self._merged.append(update.device_id)

    def result(self) -> tuple[Weights, MergeReport]:
        """The merged global weights and a report. Unheld elements keep their values."""
        merged: Weights = {}
        var_total = 0.0
        energy_total = 0.0
        held = 0
        total = 0
        for name, old in self._old.items():
            wsum = self._wsum[name]
            mask = wsum > 0
            mean = np.where(mask, self._sum[name] / np.where(mask, wsum, 1.0), old)
            merged[name] = mean.astype(np.float32)
            shared = self._holders[name] >= 2
            if np.any(shared):
                ws = wsum[shared]
                second = self._sq[name][shared] / ws
                var = np.maximum(second - mean[shared] ** 2, 0.0)
                drift = (mean[shared] - old[shared]) ** 2
                var_total += float(var.sum())
                energy_total += float((var + drift).sum())
            held += int(mask.sum())
            total += mask.size
        disagreement = var_total / energy_total if energy_total > 0 else 0.0
        report = MergeReport(
            merged=tuple(self._merged),
            rejected=dict(self._rejected),
            disagreement=disagreement,
            coverage=held / total if total else 0.0,
        )
        return merged, report


def merge_slices(
    global_w: Mapping[str, npt.NDArray[np.float32]],
    spec: ModelSpec,
    updates: Sequence[SliceUpdate],
    round_idx: int,
) -> tuple[Weights, MergeReport]:
    """Merge a round's slices into the global weights (pure: inputs are not modified).

    Invalid slices are left out and listed in the report with their reason.
    """
    acc = MergeAccumulator(global_w, spec, round_idx)
    for update in updates:
        try:
            acc.add(update)
        except InvalidSlice:
            continue
    return acc.result()
