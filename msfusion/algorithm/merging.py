"""Overlap-aware merging of returned weight slices (msfusion.md, section 4; numpy, torch-free).

Every element's new value is the sample-weighted average of the values
returned by the devices that held it; elements no device held keep their
value. Every slice is validated (round, device, sample count, unit indices,
tensor names, dtypes, shapes, finiteness) before anything of it is
accumulated, so a rejected slice touches nothing.

Speed and memory: a window is at most two runs of units per grouped axis, so
a slice lands in a few contiguous blocks of each tensor, worked on through
slice views in cache-sized pieces (fancy indexing only for scattered units).
The sums are of updates (value - sent) in float32, the squared updates only on
each tensor's grid of grouped axes, and per-element weights and holder
counts are never stored: a slice holds a product of unit sets, so they are
rebuilt per tensor from the slices' unit sets by one matrix product. The
accumulator is at most 2x the model's fp32 size (bench/fleet.py --merge
prints it with the throughput and the error against a float64 merge).

Late slices (asynchronous rounds): a slice trained for an earlier round
carries `base`, the sub-model it was sent; its update (value - base) is
added to this round's model with its sample count times the staleness
weight (1 + s)^-a, s the rounds it is late (FedAsync's polynomial rule,
Xie et al. 2019), and refused beyond `max_staleness` rounds.

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
from typing import Any, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.indexing import (
    CHUNK,
    Block,
    IndexArray,
    blocks_of_runs,
    expand_units,
    open_index,
    pieces,
    runs,
)
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
        staleness_exponent: a in the weight (1 + s)^-a of a slice merged s
            rounds after the round it was trained for (asynchronous rounds;
            0: late slices count in full). The default 0.5 halves a slice
            three rounds late.
        max_staleness: a slice more than this many rounds late is refused.
    """

    norm_bound: float = 10.0
    norm_action: NormAction = NormAction.REJECT
    aggregate: Aggregate = Aggregate.MEAN
    trim: float = 0.25
    staleness_exponent: float = 0.5
    max_staleness: int = 2

    def __post_init__(self) -> None:
        if not (self.norm_bound == 0 or (math.isfinite(self.norm_bound) and self.norm_bound >= 1)):
            raise ConfigError(
                f"merge.norm_bound must be 0 (off) or >= 1 (a bound below the median refuses honest slices), "
                f"got {self.norm_bound}"
            )
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"merge.trim must be in [0, 0.5), got {self.trim}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ConfigError(f"merge.staleness_exponent must be >= 0, got {self.staleness_exponent}")
        if self.max_staleness < 0:
            raise ConfigError(f"merge.max_staleness must be >= 0, got {self.max_staleness}")

    def staleness_weight(self, staleness: int) -> float:
        """(1 + s)^-a: how much a slice `staleness` rounds late counts, per sample, against a fresh one."""
        return float((1.0 + staleness) ** -self.staleness_exponent)

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
        base: for a slice of an earlier round (asynchronous rounds), the
            sub-model it was sent, under the same names and shapes: its update
            is (weights - base). None: the round's own slice, whose update is
            against the model being merged.
    """

    device_id: str
    round_idx: int
    units: Mapping[str, IndexArray]
    weights: Mapping[str, npt.NDArray[np.float32]]
    n_samples: int
    base: Mapping[str, npt.NDArray[np.float32]] | None = None


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
class _Place:
    """Where one tensor of a slice lands in the full tensor.

    Contiguous blocks (slice views: no copies, no fancy indexing) in the usual
    case, since a window is at most two runs of units per grouped axis; an
    open fancy index for scattered units (FedDropout's random subsets).
    `grouped` are the tensor's grouped axes, in order: the axes of its grid
    (the tensor with every other axis summed out), where a slice's weight is
    constant over each ungrouped extent.
    """

    grouped: tuple[int, ...]
    blocks: tuple[Block, ...] | None
    fancy: tuple[IndexArray, ...] = ()
    fancy_grid: Any = ()
    _pieces: tuple[tuple[Any, Any, Any], ...] = ()

    @classmethod
    def of(
        cls,
        shape: tuple[int, ...],
        axes: Mapping[int, tuple[str, int]],
        units: Mapping[str, IndexArray],
        unit_runs: Mapping[str, list[tuple[int, int, int]]],
    ) -> _Place:
        """The place of a tensor with grouped `axes` (axis -> (group, unit size)) for a slice's units and their runs."""
        grouped = tuple(sorted(axes))
        axis_runs = {
            axis: [(a * size, b * size, p * size) for a, b, p in unit_runs[group]]
            for axis, (group, size) in axes.items()
        }
        found = blocks_of_runs(shape, axis_runs)
        if found is not None:
            # A tensor without grouped axes has a 0-d grid: `...` indexes it as a view (`()` would copy).
            cut = tuple(
                (full, sub, tuple(full[a] for a in grouped) if grouped else Ellipsis)
                for block in found
                for full, sub in pieces(block)
            )
            return cls(grouped, tuple(found), _pieces=cut)
        index = {axis: expand_units(units[group], size) for axis, (group, size) in axes.items()}
        fancy = open_index(shape, index)
        grid: Any = Ellipsis  # a 0-d grid (no grouped axes): a view
        if grouped:
            grid = open_index(tuple(shape[a] for a in grouped), {i: index[a] for i, a in enumerate(grouped)})
        return cls(grouped, None, fancy, grid, ((fancy, Ellipsis, grid),))

    def pieces(self) -> tuple[tuple[Any, Any, Any], ...]:
        """(full-tensor index, sub-tensor index, grid index) triples that together cover the sub-tensor once."""
        return self._pieces

    def add(self, target: npt.NDArray[Any], index: Any, values: Any) -> None:
        """target[index] += values, in place on a view where the index is one."""
        if self.blocks is None:
            target[index] += values
        else:
            view = target[index]
            view += values


@dataclass(frozen=True)
class _Valid:
    """A validated slice: what it held, where its values go, and its update norm."""

    device_id: str
    weight: float
    units: Mapping[str, IndexArray]
    places: Mapping[str, _Place]
    values: Mapping[str, npt.NDArray[np.floating[Any]]]  # as the device returned them (by reference)
    norm: float
    scale: float = 1.0  # < 1: its update is clipped to the norm bound
    base: Mapping[str, npt.NDArray[np.floating[Any]]] | None = None  # a late slice's sent sub-model


def _start(
    base: Mapping[str, npt.NDArray[Any]] | None, name: str, old: npt.NDArray[np.float32], full: Any, sub: Any
) -> npt.NDArray[Any]:
    """What a slice's values at `sub` (`full` in the tensor) are an update from: the model, or a late slice's base."""
    return old[full] if base is None else base[name][sub]


class _Scratch:
    """Reused piece-sized buffers: a fresh array per piece costs more (page faults after malloc trims) than its arithmetic."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self._dtype = dtype
        self._buffers: dict[int, npt.NDArray[Any]] = {}

    def take(self, slot: int, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """Buffer `slot` as an array of `shape` (contents undefined)."""
        n = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.size < n:
            buf = self._buffers[slot] = np.empty(max(n, CHUNK), self._dtype)
        return buf[:n].reshape(shape)


class _Sums:
    """Streaming sums of the folded slices' updates (value - sent).

    Per tensor: the weighted sum of updates (float32, the tensor's shape), and
    on its grid (grouped axes only, others summed out) the weighted sum of
    squared updates, for the disagreement. A slice's weight is constant over
    every ungrouped extent, so per-element weights and holder counts are never
    stored: `counts` rebuilds them per unit from the folded slices' unit sets
    (their values are not kept). Memory: at most 2x the model's fp32 size (1x
    plus the grids; a conv kernel's grid is 1/9 of it). Sums of updates
    rather than of values: the merged value is sent + mean update, which
    float32 holds far better than a mean of values.
    """

    def __init__(self, old: Mapping[str, npt.NDArray[np.float32]], spec: ModelSpec) -> None:
        self.spec = spec
        self.sum = {n: np.zeros(a.shape, np.float32) for n, a in old.items()}
        self.sq = {n: np.zeros(_grid_shape(spec, n), np.float32) for n in old}
        self.folded: list[tuple[float, Mapping[str, IndexArray]]] = []

    def fold(self, valid: _Valid, old: Mapping[str, npt.NDArray[np.float32]]) -> None:
        for name, place in valid.places.items():
            arr = valid.values[name]
            total, square = self.sum[name], self.sq[name]
            scratch = _Scratch(np.result_type(arr.dtype, np.float32))
            for full, sub, grid in place.pieces():
                piece = arr[sub]
                update = scratch.take(0, piece.shape)
                np.subtract(piece, _start(valid.base, name, old[name], full, sub), out=update)
                if valid.scale != 1.0:
                    update *= valid.scale
                squared = scratch.take(1, piece.shape)
                np.multiply(update, update, out=squared)
                squares = _to_grid(squared, place.grouped)
                squares *= valid.weight
                place.add(square, grid, squares)
                update *= valid.weight
                place.add(total, full, update)
        self.folded.append((valid.weight, valid.units))

    def counts(self, name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
        """On one tensor's grid: the folded slices' total weight, and how many held each position.

        Each is a sum over slices of an outer product of per-unit indicators
        (a slice holds a product of unit sets): one matrix product per tensor.
        """
        axes = self.spec.sliced_axes(name)
        weights = np.array([w for w, _ in self.folded], np.float32)
        ones = np.ones_like(weights)
        out = []
        for per_slice in (weights, ones):
            factors = []
            for axis in sorted(axes):
                group, unit_size = axes[axis]
                held = np.zeros((len(self.folded), self.spec.group(group).size), np.float32)
                for row, (_, units) in zip(held, self.folded):
                    row[units[group]] = 1.0
                factors.append(np.repeat(held, unit_size, axis=1) if unit_size > 1 else held)
            if not factors:
                out.append(np.asarray(per_slice.sum(), np.float32).reshape(()))
            elif len(factors) == 1:
                out.append(per_slice @ factors[0])
            else:
                letters = "abcdefgh"[: len(factors)]
                subscripts = "z,{}->{}".format(",".join("z" + c for c in letters), letters)
                out.append(np.einsum(subscripts, per_slice, *factors, optimize=True).astype(np.float32))
        return out[0], np.rint(out[1]).astype(np.int32)


def _grid_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """A tensor's shape on its grouped axes only (() for a tensor without any)."""
    shape = spec.shapes[name]
    return tuple(shape[a] for a in sorted(spec.sliced_axes(name)))


def _on_tensor(grid: npt.NDArray[Any], shape: tuple[int, ...], grouped: tuple[int, ...]) -> npt.NDArray[Any]:
    """A grid array as a view broadcastable against its tensor (ungrouped axes of length 1)."""
    return grid.reshape([shape[a] if a in grouped else 1 for a in range(len(shape))])


def _to_grid(values: npt.NDArray[Any], grouped: tuple[int, ...]) -> npt.NDArray[Any]:
    """`values` summed over its ungrouped axes (trailing ones, a conv kernel's, by a matrix-vector product)."""
    summed = tuple(a for a in range(values.ndim) if a not in grouped)
    if not summed:
        return values
    k = values.ndim - len(summed)
    if summed == tuple(range(k, values.ndim)) and k > 0:  # numpy reduces short trailing axes slowly
        flat = values.reshape((*values.shape[:k], -1))
        return flat @ np.ones(flat.shape[-1], values.dtype)
    return values.sum(axis=summed)


def _finish(
    old: npt.NDArray[np.float32],
    total: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    grouped: tuple[int, ...],
    drift: bool,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64] | None]:
    """old + mean update (total / weight; 0 where weight is 0), and the mean update's squares on the grid.

    In row chunks, so the temporaries stay in cache: one pass over the tensor.
    """
    safe = _on_tensor(np.where(weight > 0, weight, 1.0).astype(np.float32), old.shape, grouped)
    out = np.empty_like(old)
    squares = np.zeros(weight.shape, np.float64) if drift else None
    if old.ndim == 0:
        mean = total / safe
        out[...] = old + mean
        if squares is not None:
            squares[...] = float(mean) ** 2
        return out, squares
    step = max(1, CHUNK // max(1, old[0].size))
    by_row = 0 in grouped
    for r in range(0, old.shape[0], step):
        rows = slice(r, r + step)
        mean = total[rows] / (safe[rows] if by_row else safe)
        np.add(mean, old[rows], out=out[rows])
        if squares is not None:
            mean *= mean
            part = _to_grid(mean, grouped)
            if by_row:
                squares[rows] += part
            else:
                squares += part
    return out, squares


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
        self._axes = {name: spec.sliced_axes(name) for name in spec.shapes}
        self._sums = _Sums(self._old, spec) if not self._config.keeps_slices else None
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
        late = self._round - update.round_idx if isinstance(update.round_idx, int) else -1
        if late != 0 and (update.base is None or late < 0):
            raise InvalidSlice(f"slice is for round {update.round_idx}, merging round {self._round}")
        if late > self._config.max_staleness:
            raise InvalidSlice(
                f"slice is for round {update.round_idx}, {late} rounds late "
                f"(merge.max_staleness is {self._config.max_staleness})"
            )
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
        base = self._validate_base(update, widths) if update.base is not None else None
        unit_runs = {g: runs(u) for g, u in units.items()}
        places: dict[str, _Place] = {}
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
            if arr.dtype.itemsize > 4 and arr.size and float(np.abs(arr).max()) > float(np.finfo(np.float32).max):
                raise InvalidSlice(f"{name}: values beyond float32's range (infinite in the merged model)")
            place = _Place.of(self._spec.shapes[name], self._axes[name], units, unit_runs)
            sent = self._old[name]
            squares = 0.0  # one pass: a NaN or infinity anywhere makes the sum of squares non-finite
            scratch = _Scratch(np.result_type(arr.dtype, np.float32))
            for full, sub, _ in place.pieces():
                piece = arr[sub]
                d = scratch.take(0, piece.shape)
                np.subtract(piece, _start(base, name, sent, full, sub), out=d)
                flat = d.reshape(-1)
                squares += float(np.dot(flat, flat))
            if not math.isfinite(squares):
                if not np.all(np.isfinite(arr)):
                    raise InvalidSlice(f"{name}: non-finite values")
                squares = 0.0  # finite values whose float32 squares overflow: again in float64
                for full, sub, _ in place.pieces():
                    squares += float(np.square(arr[sub].astype(np.float64) - _start(base, name, sent, full, sub)).sum())
            places[name] = place
            square_sum += squares
            elements += arr.size
        norm = math.sqrt(square_sum / elements) if elements else 0.0
        if not math.isfinite(norm):  # finite float32 values whose squares overflow float64 cannot, but be sure
            raise InvalidSlice(f"update norm is not finite ({norm})")
        weight = float(n_samples) * self._config.staleness_weight(late)
        return _Valid(update.device_id, weight, units, places, dict(update.weights), norm, base=base)

    def _validate_base(
        self, update: SliceUpdate, widths: Mapping[str, int]
    ) -> dict[str, npt.NDArray[np.floating[Any]]]:
        """A late slice's sent sub-model: the slice's tensor names and shapes, finite floats."""
        assert update.base is not None
        if set(update.base) != set(self._spec.shapes):
            raise InvalidSlice("its base (the sub-model it was sent) names other tensors than the model")
        base = {}
        for name in self._spec.shapes:
            arr = update.base[name]
            expected = self._spec.sub_shape(name, widths)
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f" or tuple(arr.shape) != expected:
                raise InvalidSlice(f"{name}: its base is not a floating-point array of shape {expected}")
            if not np.all(np.isfinite(arr)):
                raise InvalidSlice(f"{name}: its base has non-finite values")
            base[name] = arr
        return base

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

    def accumulator_bytes(self) -> int:
        """Bytes of the merge's sums (allocated while streaming, at `result()` when slices are kept).

        The updates' weighted sum (the model's fp32 size) plus the squared
        updates on each tensor's grid: at most 2x the model's fp32 size.
        Zeroed pages no slice touched are never written (the sums come from
        calloc), so resident memory is often less.
        """
        sizes = ((math.prod(shape), math.prod(_grid_shape(self._spec, n))) for n, shape in self._spec.shapes.items())
        return 4 * sum(a + b for a, b in sizes)

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
            sums = _Sums(self._old, self._spec)
            for valid in survivors:
                sums.fold(valid, self._old)
        merged_ids = tuple(self._accepted) if self._sums is not None else tuple(v.device_id for v in survivors)
        merged: Weights = {}
        var_total = 0.0
        energy_total = 0.0
        held = 0
        total = 0
        eps = float(np.finfo(np.float32).eps)
        for name, old in self._old.items():
            grouped = tuple(sorted(self._spec.sliced_axes(name)))
            weight, holders = sums.counts(name)  # on the tensor's grid
            held_grid = holders > 0
            shared = holders >= 2
            any_shared = bool(np.any(shared))
            if self._config.aggregate is Aggregate.MEAN:
                merged[name], drift_grid = _finish(old, sums.sum[name], weight, grouped, any_shared)
            else:
                every = np.broadcast_to(_on_tensor(holders, old.shape, grouped), old.shape)
                merged[name] = _robust(name, old, survivors, every, self._config).astype(np.float32)
                _, drift_grid = _finish(old, sums.sum[name], weight, grouped, any_shared)
            if any_shared and drift_grid is not None:
                w = weight[shared].astype(np.float64)
                second = sums.sq[name][shared] / w
                drift = drift_grid[shared]
                var = second - drift
                # below float32's resolution of the second moment a variance is rounding, not disagreement
                var[var <= 4 * eps * holders[shared] * second] = 0.0
                var_total += float(var.sum())
                energy_total += float((var + drift).sum())
            extent = old.size // max(1, holders.size)  # elements per grid position
            held += int(held_grid.sum()) * extent
            total += old.size
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
        arr, place = valid.values[name], valid.places[name]
        for full, sub, _ in place.pieces():
            if valid.base is None and valid.scale == 1.0:
                row[full] = arr[sub]
                continue
            sent = old[full].astype(np.float64)  # a late slice's update lands on this round's model
            row[full] = sent + valid.scale * (arr[sub] - _start(valid.base, name, old, full, sub))
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
