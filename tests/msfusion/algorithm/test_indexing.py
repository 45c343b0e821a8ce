"""Device-side index arithmetic: re-slicing the previous local sub-model."""

from __future__ import annotations

import numpy as np

from msfusion.algorithm.indexing import expand_units, reslice_previous, take


def test_expand_units() -> None:
    np.testing.assert_array_equal(expand_units(np.array([0, 2]), 3), [0, 1, 2, 6, 7, 8])
    np.testing.assert_array_equal(expand_units(np.array([4, 1]), 1), [4, 1])


def test_reslice_takes_previous_values_on_shared_units_and_global_elsewhere() -> None:
    full_global = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    prev_idx = {"w": {0: np.array([0, 1, 2])}}
    cur_idx = {"w": {0: np.array([2, 3, 4])}}
    previous = {"w": take(full_global, prev_idx["w"]) + 100}
    current = {"w": take(full_global, cur_idx["w"])}
    out = reslice_previous(current, cur_idx, previous, prev_idx)
    np.testing.assert_array_equal(out["w"][0], full_global[2] + 100)  # held both rounds
    np.testing.assert_array_equal(out["w"][1:], full_global[3:5])  # new this round: global
    # No previous slice: the global sub-model itself.
    np.testing.assert_array_equal(reslice_previous(current, cur_idx, None, None)["w"], current["w"])


def test_reslice_on_two_grouped_axes() -> None:
    full = np.arange(25, dtype=np.float32).reshape(5, 5)
    prev_idx = {"w": {0: np.array([0, 1]), 1: np.array([3, 4])}}
    cur_idx = {"w": {0: np.array([1, 2]), 1: np.array([0, 4])}}
    previous = {"w": take(full, prev_idx["w"]) * -1}
    out = reslice_previous({"w": take(full, cur_idx["w"])}, cur_idx, previous, prev_idx)
    expected = take(full, cur_idx["w"])
    expected[0, 1] = -full[1, 4]
    np.testing.assert_array_equal(out["w"], expected)
