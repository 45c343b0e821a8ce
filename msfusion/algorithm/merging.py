"""Overlap-aware merging of returned weight slices (msfusion.md, section 4; numpy, torch-free).

Every element's new value is the sample-weighted average of the values
returned by the devices that held it; elements no device held keep their
value. Every slice is validated (round, device, sample count, unit indices,
tensor names, dtypes, shapes, finiteness) before anything of it is
accumulated, so a rejected slice touches nothing.

Poisoning defences (`MergeConfig`, the run file's `[engine.merge]`): a bound
on each slice's update norm relative to the round's median (on by default:
10x, reject), and robust aggregates (coordinate-wise trimmed mean, median)
beside the sample-weighted mean (the default, the paper's merge). Without
them the accumulator streams (memory O(model) whatever the number of
devices); with them it keeps the validated slices until `result()`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.indexing import IndexArray, open_index
from msfusion.algorithm.slicing import Weights
from msfusion.algorithm.spec import ModelSpec
from msfusion.errors import ConfigError, InvalidSlice

NORM_MIN_SLICES = 3  # below this a round's median says nothing about which slice is the odd one out


class NormAction(enum.Enum):
    """What happens to a slice whose update norm is above the bound."""

    REJECT = "reject"  # left out of the merge, the reason in `MergeReport.rejected`
    CLIP = "clip"  # its update (returned - sent) scaled down to the bound, the reason in `MergeReport.clipped`


class Aggregate(enum.Enum):
    """How the values the holders of one element returned become its merged value."""

    MEAN = "mean"  # sample-weighted mean (the paper's merge)
    TRIMMED_MEAN = "trimmed_mean"  # unweighted mean after dropping the `trim` share at each end
    MEDIAN = "median"  # unweighted median


@dataclass(frozen=True)
class MergeConfig:
    """How a round's slices are merged, and the defences against poisoned ones.

    A slice's update norm is the RMS, over all its elements, of (returned
    value - the global value it was sent). Honest slices of one round differ
    in it by a small factor; a scaled or boosted update stands out.

    Attributes:
        norm_bound: a slice whose update norm is above `norm_bound` x the
            round's median (over its valid slices; only with at least
            `NORM_MIN_SLICES` of them and a median > 0) is rejected or
            clipped. 0 turns the bound off.
        norm_action: reject (default) or clip such a slice.
        aggregate: sample-weighted mean (default), or a coordinate-wise robust
            statistic over each element's holders (trimmed mean, median); the
            robust ones ignore sample counts (a count is only the device's
            claim) and need at least three holders to outvote anyone.
        trim: share of an element's holders dropped at each end by the
            trimmed mean (floor(trim x holders) each side), in [0, 0.5); the
            default 0.25 drops one of four holders each side (msfusion's
            windows give few holders per element: 0.2 would trim none of four).
    """

    norm_bound: float = 10.0
    norm_action: NormAction = NormAction.REJECT
    aggregate: Aggregate = Aggregate.MEAN
    trim: float = 0.25

    def __post_init__(self) -> None:
        if not (self.norm_bound == 0 or (math.isfinite(self.norm_bound) and self.norm_bound >= 1)):
            raise ConfigError(
                f"merge.norm_bound must be 0 (off) or >= 1 (a bound below the median refuses honest slices), "
                f"got {self.norm_bound}"
            )
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"merge.trim must be in [0, 0.5), got {self.trim}")

    @property
    def keeps_slices(self) -> bool:
        """Whether the merge needs every slice before it can merge any (no streaming)."""
        return self.norm_bound > 0 or self.aggregate is not Aggregate.MEAN


@dataclass(frozen=True)
class SliceUpdate:
    """One device's trained slice, as the merge sees it.

    Attributes:
        device_id: who trained it.
        round_idx: the round it was trained for.
        units: unit indices per group it held (as planned), 1-D integer arrays.
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
            0 = all holders agree, 1 = their updates cancel out. Measured on
            the sample-weighted statistics of the merged slices whatever the aggregate.
        coverage: share of the model's elements that at least one device held.
        clipped: device id -> reason, for merged slices whose update was scaled down to the norm bound.
        update_norms: device id -> update norm (RMS of returned - sent), for every valid slice.
    """

    merged: tuple[str, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)
    disagreement: float = 0.0
    coverage: float = 0.0
    clipped: Mapping[str, str] = field(default_factory=dict)
    update_norms: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Valid:
    """A validated slice: where its values go, and its update norm."""

    device_id: str
    weight: float
    positions: Mapping[str, tuple[IndexArray, ...]]
    values: Mapping[str, npt.NDArray[np.float32]]  # as the device returned them (by reference)
    norm: float
    scale: float = 1.0  # < 1: its update is clipped to the norm bound


class _Sums:
    """Streaming sums per element: weighted sum, weighted square sum, weight, holder count."""

    def __init__(self, old: Mapping[str, npt.NDArray[np.float32]]) -> None:
        self.sum = {n: np.zeros(a.shape, np.float64) for n, a in old.items()}
        self.sq = {n: np.zeros(a.shape, np.float64) for n, a in old.items()}
        self.wsum = {n: np.zeros(a.shape, np.float64) for n, a in old.items()}
        self.holders = {n: np.zeros(a.shape, np.int32) for n, a in old.items()}

    def fold(self, valid: _Valid, old: Mapping[str, npt.NDArray[np.float32]]) -> None:
        for name, pos in valid.positions.items():
            values = _returned(valid, name, old)
            self.sum[name][pos] += valid.weight * values
            self.sq[name][pos] += valid.weight * values * values
            self.wsum[name][pos] += valid.weight
            self.holders[name][pos] += 1


def _returned(valid: _Valid, name: str, old: Mapping[str, npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
    """The values a slice contributes for one tensor (float64; a clipped update scaled down)."""
    values = np.asarray(valid.values[name], dtype=np.float64)
    if valid.scale == 1.0:
        return values
    sent = old[name][valid.positions[name]].astype(np.float64)
    return sent + valid.scale * (values - sent)


class MergeAccumulator:
    """Sample-weighted (or robust), overlap-aware merge of slices into the global model.

    With `config.keeps_slices` False (no norm bound, the mean) every valid
    slice is folded in as it comes: memory O(model). Otherwise (the default:
    the norm bound needs the round's median) the validated slices are kept,
    by reference, until `result()`: memory O(model) plus the sum of the slice
    sizes (plus, for a robust aggregate, one tensor's values from every slice
    at a time). Do not modify a slice's arrays after `add`.
    """

    def __init__(
        self,
        global_w: Mapping[str, npt.NDArray[np.float32]],
        spec: ModelSpec,
        round_idx: int,
        config: MergeConfig | None = None,
    ) -> None:
        self._spec = spec
        self._round = round_idx
        self._config = config if config is not None else MergeConfig()
        self._old = {name: np.asarray(global_w[name], dtype=np.float32) for name in spec.shapes}
        self._sums = _Sums(self._old) if not self._config.keeps_slices else None
        self._kept: list[_Valid] = []
        self._accepted: list[str] = []
        self._norms: dict[str, float] = {}
        self._rejected: dict[str, str] = {}

    def _validate_units(self, update: SliceUpdate) -> dict[str, IndexArray]:
        groups = {g.name: g.size for g in self._spec.groups}
        missing = set(groups) - set(update.units)
        extra = set(update.units) - set(groups)
        if missing or extra:
            raise InvalidSlice(f"unit groups differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        units: dict[str, IndexArray] = {}
        for group, size in groups.items():
            raw = update.units[group]
            if not isinstance(raw, np.ndarray):
                raise InvalidSlice(f"group {group!r}: unit indices must be a numpy array, got {type(raw).__name__}")
            if raw.dtype.kind not in "iu":
                raise InvalidSlice(f"group {group!r}: unit indices must be integers, got dtype {raw.dtype}")
            if raw.ndim != 1:
                raise InvalidSlice(f"group {group!r}: unit indices must be 1-D, got shape {raw.shape}")
            if raw.size == 0:
                raise InvalidSlice(f"group {group!r}: holds no units")
            if raw.dtype.kind == "u" and int(raw.max()) >= size:  # an unsigned index cannot be negative
                raise InvalidSlice(f"group {group!r}: unit index {int(raw.max())} out of range [0, {size})")
            idx = raw.astype(np.int64)
            if int(idx.min()) < 0:
                raise InvalidSlice(f"group {group!r}: negative unit index {int(idx.min())}")
            if int(idx.max()) >= size:
                raise InvalidSlice(f"group {group!r}: unit index {int(idx.max())} out of range [0, {size})")
            values, counts = np.unique(idx, return_counts=True)
            if values.size != idx.size:
                raise InvalidSlice(f"group {group!r}: unit indices repeat: {values[counts > 1].tolist()}")
            units[group] = idx
        return units

    def _validate(self, update: SliceUpdate) -> _Valid:
        if update.round_idx != self._round:
            raise InvalidSlice(f"slice is for round {update.round_idx}, merging round {self._round}")
        if update.device_id in self._accepted:
            raise InvalidSlice(f"duplicate slice from {update.device_id} in round {self._round}")
        n_samples = update.n_samples
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
            raise InvalidSlice(f"n_samples must be an integer, got {n_samples!r}")
        if n_samples <= 0:
            raise InvalidSlice(f"n_samples must be > 0, got {n_samples}")
        units = self._validate_units(update)
        missing = set(self._spec.shapes) - set(update.weights)
        extra = set(update.weights) - set(self._spec.shapes)
        if missing or extra:
            raise InvalidSlice(f"tensor names differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        widths = {g: len(u) for g, u in units.items()}
        positions: dict[str, tuple[IndexArray, ...]] = {}
        square_sum = 0.0
        elements = 0
        for name in self._spec.shapes:
            arr = update.weights[name]
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                kind = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise InvalidSlice(f"{name}: values must be a floating-point array, got {kind}")
            expected = self._spec.sub_shape(name, widths)
            if tuple(arr.shape) != expected:
                raise InvalidSlice(f"{name}: shape {tuple(arr.shape)}, expected {expected}")
            if not np.all(np.isfinite(arr)):
                raise InvalidSlice(f"{name}: non-finite values")
            if arr.dtype.itemsize > 4 and arr.size and float(np.abs(arr).max()) > float(np.finfo(np.float32).max):
                raise InvalidSlice(f"{name}: values beyond float32's range (infinite in the merged model)")
            positions[name] = open_index(self._spec.shapes[name], self._spec.tensor_index(name, units))
            update_values = arr.astype(np.float64) - self._old[name][positions[name]]
            square_sum += float(np.square(update_values).sum())
            elements += update_values.size
        norm = math.sqrt(square_sum / elements) if elements else 0.0
        if not math.isfinite(norm):  # finite float32 values whose squares overflow float64 cannot, but be sure
            raise InvalidSlice(f"update norm is not finite ({norm})")
        return _Valid(update.device_id, float(n_samples), positions, dict(update.weights), norm)

    def add(self, update: SliceUpdate) -> None:
        """Validate one slice and fold it in (or keep it for `result()`); a slice that fails changes nothing.

        Raises:
            InvalidSlice: wrong round, duplicate device, no or non-integer
                samples, unit indices that are missing, not a 1-D integer
                array, negative, out of range or repeated, wrong tensor names,
                dtypes or shapes, or non-finite values (or, in a wider float,
                values beyond float32's range). The reason is also
                kept in the report.
        """
        try:
            valid = self._validate(update)
        except InvalidSlice as exc:
            self._rejected[update.device_id] = str(exc)
            raise
        if self._sums is not None:
            self._sums.fold(valid, self._old)
        else:
            self._kept.append(valid)
        self._accepted.append(update.device_id)
        self._norms[update.device_id] = valid.norm

    def _screen(self) -> tuple[list[_Valid], dict[str, str], dict[str, str]]:
        """The kept slices under the norm bound: (survivors, rejected reasons, clipped reasons)."""
        cfg = self._config
        if cfg.norm_bound <= 0 or len(self._kept) < NORM_MIN_SLICES:
            return list(self._kept), {}, {}
        median = float(np.median([v.norm for v in self._kept]))
        if median <= 0:  # most slices did not move: no scale to measure the others against
            return list(self._kept), {}, {}
        bound = cfg.norm_bound * median
        survivors: list[_Valid] = []
        rejected: dict[str, str] = {}
        clipped: dict[str, str] = {}
        for valid in self._kept:
            if valid.norm <= bound:
                survivors.append(valid)
                continue
            reason = (
                f"update norm {valid.norm:.3g} is {valid.norm / median:.1f}x the round's median {median:.3g} "
                f"(bound {cfg.norm_bound:g}x)"
            )
            if cfg.norm_action is NormAction.REJECT:
                rejected[valid.device_id] = reason
            else:
                scale = bound / valid.norm
                clipped[valid.device_id] = f"{reason}: scaled by {scale:.3g}"
                survivors.append(dataclasses.replace(valid, scale=scale))
        return survivors, rejected, clipped

    def result(self) -> tuple[Weights, MergeReport]:
        """The merged global weights and a report. Unheld elements keep their values.

        Pure: calling it again gives the same answer.
        """
        survivors, rejected, clipped = self._screen()
        sums = self._sums
        if sums is None:  # the kept slices, folded in the order they came
            sums = _Sums(self._old)
            for valid in survivors:
                sums.fold(valid, self._old)
        merged_ids = tuple(self._accepted) if self._sums is not None else tuple(v.device_id for v in survivors)
        merged: Weights = {}
        var_total = 0.0
        energy_total = 0.0
        held = 0
        total = 0
        for name, old in self._old.items():
            wsum = sums.wsum[name]
            mask = wsum > 0
            mean = np.where(mask, sums.sum[name] / np.where(mask, wsum, 1.0), old)
            if self._config.aggregate is Aggregate.MEAN:
                merged[name] = mean.astype(np.float32)
            else:
                merged[name] = _robust(name, old, survivors, sums.holders[name], self._config).astype(np.float32)
            shared = sums.holders[name] >= 2
            if np.any(shared):
                ws = wsum[shared]
                second = sums.sq[name][shared] / ws
                var = np.maximum(second - mean[shared] ** 2, 0.0)
                drift = (mean[shared] - old[shared]) ** 2
                var_total += float(var.sum())
                energy_total += float((var + drift).sum())
            held += int(mask.sum())
            total += mask.size
        disagreement = var_total / energy_total if energy_total > 0 else 0.0
        report = MergeReport(
            merged=merged_ids,
            rejected={**self._rejected, **rejected},
            disagreement=disagreement,
            coverage=held / total if total else 0.0,
            clipped=clipped,
            update_norms=dict(self._norms),
        )
        return merged, report


def _robust(
    name: str,
    old: npt.NDArray[np.float32],
    survivors: Sequence[_Valid],
    holders: npt.NDArray[np.int32],
    config: MergeConfig,
) -> npt.NDArray[np.float64]:
    """One tensor's coordinate-wise trimmed mean or median over each element's holders (unheld: `old`).

    Memory: one float64 copy of the tensor per slice.
    """
    if not survivors:
        return old.astype(np.float64)
    stack = np.full((len(survivors), *old.shape), np.nan)
    for row, valid in zip(stack, survivors):
        row[valid.positions[name]] = _returned(valid, name, {name: old})
    ordered = np.sort(stack, axis=0)  # per element: its holders' values ascending, then NaN (not held)
    if config.aggregate is Aggregate.MEDIAN:
        # leaves the middle one (odd) or two (even); an element no one held (-1 // 2 = -1) keeps nothing
        cut = np.maximum((holders - 1) // 2, 0)
    else:
        cut = np.floor(config.trim * holders).astype(np.int64)
    rank = np.arange(len(survivors)).reshape((-1,) + (1,) * old.ndim)
    keep = (rank >= cut) & (rank < holders - cut)
    kept = keep.sum(axis=0)
    total = np.where(keep, ordered, 0.0).sum(axis=0)
    return np.where(kept > 0, total / np.maximum(kept, 1), old)


def merge_slices(
    global_w: Mapping[str, npt.NDArray[np.float32]],
    spec: ModelSpec,
    updates: Sequence[SliceUpdate],
    round_idx: int,
    config: MergeConfig | None = None,
) -> tuple[Weights, MergeReport]:
    """Merge a round's slices into the global weights (pure: inputs are not modified).

    Args:
        global_w: the global weights the slices were cut from.
        spec: the model's spec.
        updates: the round's slices, in the order they are folded in.
        round_idx: the round being merged.
        config: the merge and its defences (default `MergeConfig()`: the
            sample-weighted mean with the 10x update-norm bound).

    Returns:
        The merged weights, and a report; invalid slices, and slices refused by
        the norm bound, are left out and listed in it with their reason.
    """
    acc = MergeAccumulator(global_w, spec, round_idx, config)
    for update in updates:
        try:
            acc.add(update)
        except InvalidSlice:
            continue
    return acc.result()
