"""Expected-sub-model inference weights against a hand computation."""

from __future__ import annotations

import numpy as np

from msfusion.algorithm.inference import CoHoldStats
from msfusion.algorithm.spec import ModelSpec


def test_factors_match_hand_count(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    # Prepare: two slices share group b's units {0, 1}, split group a in halves.
    stats = CoHoldStats(tiny_spec, ["l2.weight", "head.weight"])
    scales = {"l2.weight": 2.0, "head.weight": 2.0}
    stats.add({"a": np.arange(4), "b": np.array([0, 1])}, scales)
    stats.add({"a": np.arange(4, 8), "b": np.array([0, 1])}, scales)
    # Execute
    out = stats.expected_weights(tiny_weights)
    # Assert: l2 rows 0-3 (b units 0, 1) were held twice, each column once at
    # scale 2: factor 2 / 2 = 1. Rows 4-7 were never held: unchanged.
    np.testing.assert_allclose(out["l2.weight"], tiny_weights["l2.weight"], rtol=1e-6)
    # head: both class rows held twice; columns 0-3 (b units 0, 1) at scale 2
    # twice -> 4 / 2 = 2; columns 4-7 never held -> 0.
    np.testing.assert_allclose(out["head.weight"][:, :4], 2 * tiny_weights["head.weight"][:, :4], rtol=1e-6)
    np.testing.assert_array_equal(out["head.weight"][:, 4:], 0.0)
    # Unscaled tensors are copied as they are.
    np.testing.assert_array_equal(out["l1.weight"], tiny_weights["l1.weight"])


def test_full_width_slices_leave_the_model_unchanged(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    stats = CoHoldStats(tiny_spec, ["l2.weight", "head.weight"])
    for _ in range(3):
        stats.add({"a": np.arange(8), "b": np.arange(4)}, {"l2.weight": 1.0, "head.weight": 1.0})
    out = stats.expected_weights(tiny_weights)
    for name, value in tiny_weights.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6)
