"""Index arithmetic on named weight tensors, shared by coordinator and device (numpy only).

A sub-model's tensor is the full tensor restricted, along each grouped axis,
to the element indices of the units held. `TensorIndex` maps axis -> element
indices for one tensor; axes not in it are kept whole.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Mapping

import numpy as np
import numpy.typing as npt

IndexArray = npt.NDArray[np.int64]
TensorIndex = Mapping[int, IndexArray]
Block = tuple[tuple[slice, ...], tuple[slice, ...]]  # (full-tensor slices, sub-tensor slices) of one block
MAX_BLOCKS = 64  # beyond this many blocks per tensor (scattered units) fancy indexing is cheaper
CHUNK = 1 << 15  # elements per piece a merge pass works on: its temporaries stay in the core's L2 cache


def expand_units(units: IndexArray, unit_size: int) -> IndexArray:
    """Unit indices -> element indices: unit u covers [u*size, (u+1)*size)."""
    units = np.asarray(units, dtype=np.int64)
    if unit_size == 1:
        return units
    return (units[:, None] * unit_size + np.arange(unit_size, dtype=np.int64)[None, :]).reshape(-1)


def open_index(shape: tuple[int, ...], index: TensorIndex) -> tuple[IndexArray, ...]:
    """An np.ix_ index selecting `index` on grouped axes and everything elsewhere."""
    return np.ix_(*[index.get(axis, np.arange(n)) for axis, n in enumerate(shape)])


def runs(idx: IndexArray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive indices in `idx`, in its order: (first full index, stop, first position in idx).

    A wrap-around window [K-2, K-1, 0, 1] (or its sorted form) is two runs.
    """
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [(int(idx[a]), int(idx[b - 1]) + 1, int(a)) for a, b in zip(starts, ends)]


def blocks(shape: tuple[int, ...], index: TensorIndex, limit: int = MAX_BLOCKS) -> list[Block] | None:
    """The sub-tensor at `index` as contiguous blocks of the full tensor, or None if it takes more than `limit`.

    Every element of the sub-tensor is in exactly one block, so a merge can
    work on slice views (no copies, no fancy indexing): a contiguous
    wrap-around window is at most two blocks per grouped axis.
    """
    return blocks_of_runs(shape, {axis: runs(idx) for axis, idx in index.items()}, limit)


def blocks_of_runs(
    shape: tuple[int, ...], axis_runs: Mapping[int, list[tuple[int, int, int]]], limit: int = MAX_BLOCKS
) -> list[Block] | None:
    """`blocks` from the runs of element indices along each grouped axis (as `runs` gives them)."""
    per_axis: list[list[tuple[slice, slice]]] = []
    for axis, n in enumerate(shape):
        if axis in axis_runs:
            per_axis.append([(slice(a, b), slice(p, p + b - a)) for a, b, p in axis_runs[axis]])
        else:
            per_axis.append([(slice(0, n), slice(0, n))])
    if math.prod(len(a) for a in per_axis) > limit:
        return None
    return [(tuple(f for f, _ in combo), tuple(s for _, s in combo)) for combo in itertools.product(*per_axis)]


def pieces(block: Block, chunk: int = CHUNK) -> Iterator[Block]:
    """A block cut along its first axis into pieces of at most ~`chunk` elements (at least one row each)."""
    full, sub = block
    if not full:
        yield block
        return
    rows = full[0].stop - full[0].start
    per_row = math.prod(s.stop - s.start for s in full[1:])
    step = max(1, chunk // max(per_row, 1))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        yield (
            (slice(full[0].start + r, full[0].start + r + n), *full[1:]),
            (slice(sub[0].start + r, sub[0].start + r + n), *sub[1:]),
        )


def take(full: npt.NDArray[np.float32], index: TensorIndex) -> npt.NDArray[np.float32]:
    """The sub-tensor of `full` at `index`: (.., K*u, ..) -> (.., k*u, ..). Always a copy."""
    out = full
    for axis, idx in sorted(index.items()):
        out = np.take(out, idx, axis=axis)
    return np.array(out, dtype=np.float32, copy=True)


def reslice_previous(
    current: Mapping[str, npt.NDArray[np.float32]],
    current_index: Mapping[str, TensorIndex],
    previous: Mapping[str, npt.NDArray[np.float32]] | None,
    previous_index: Mapping[str, TensorIndex] | None,
) -> dict[str, npt.NDArray[np.float32]]:
    """The previous local sub-model re-sliced to this round's units (msfusion.md, section 5).

    Units held in both rounds take the previous local values; units not held
    last round take this round's global values (`current`).

    Args:
        current: this round's global sub-model weights.
        current_index: per tensor, axis -> full-tensor element indices of `current`.
        previous: last round's trained local slice (None if there is none).
        previous_index: per tensor, axis -> element indices of `previous`.

    Returns:
        Weights shaped like `current`.
    """
    out = {name: np.array(arr, dtype=np.float32, copy=True) for name, arr in current.items()}
    if previous is None or previous_index is None:
        return out
    for name, cur in out.items():
        prev = previous.get(name)
        if prev is None or prev.ndim != cur.ndim:
            continue
        cur_idx = current_index.get(name, {})
        prev_idx = previous_index.get(name, {})
        cur_pos: list[IndexArray] = []
        prev_pos: list[IndexArray] = []
        for axis in range(cur.ndim):
            if axis not in cur_idx and axis not in prev_idx:
                if cur.shape[axis] != prev.shape[axis]:
                    break
                cur_pos.append(np.arange(cur.shape[axis]))
                prev_pos.append(np.arange(cur.shape[axis]))
                continue
            c = cur_idx.get(axis, np.arange(cur.shape[axis]))
            p = prev_idx.get(axis, np.arange(prev.shape[axis]))
            common, c_at, p_at = np.intersect1d(c, p, assume_unique=True, return_indices=True)
            if common.size == 0:
                break
            cur_pos.append(c_at.astype(np.int64))
            prev_pos.append(p_at.astype(np.int64))
        else:
            cur[np.ix_(*cur_pos)] = prev[np.ix_(*prev_pos)]
    return out
