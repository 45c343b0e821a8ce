"""Index arithmetic on named weight tensors, shared by coordinator and device (numpy only).

A sub-model's tensor is the full tensor restricted, along each grouped axis,
to the element indices of the units held. `TensorIndex` maps axis -> element
indices for one tensor; axes not in it are kept whole.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import numpy.typing as npt

IndexArray = npt.NDArray[np.int64]
TensorIndex = Mapping[int, IndexArray]


def expand_units(units: IndexArray, unit_size: int) -> IndexArray:
    """Unit indices -> element indices: unit u covers [u*size, (u+1)*size)."""
    units = np.asarray(units, dtype=np.int64)
    if unit_size == 1:
        return units
    return (units[:, None] * unit_size + np.arange(unit_size, dtype=np.int64)[None, :]).reshape(-1)


def open_index(shape: tuple[int, ...], index: TensorIndex) -> tuple[IndexArray, ...]:
    """An np.ix_ index selecting `index` on grouped axes and everything elsewhere."""
    return np.ix_(*[index.get(axis, np.arange(n)) for axis, n in enumerate(shape)])


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
