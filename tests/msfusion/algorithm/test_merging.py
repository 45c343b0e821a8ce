"""Slicing and merging: round trip, plain-numpy equality, rejection leaves the model untouched."""

from __future__ import annotations

import numpy as np
import pytest

from msfusion.algorithm.merging import MergeAccumulator, SliceUpdate, merge_slices
from msfusion.algorithm.planning import DeviceSlot, PlanConfig, Strategy, plan_round
from msfusion.algorithm.slicing import slice_weights
from msfusion.algorithm.spec import ModelSpec
from msfusion.errors import InvalidSlice


def units_of(plan, device):  # type: ignore[no-untyped-def]
    return plan.units(device)


def test_slice_picks_the_right_elements(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    units = {"a": np.array([1, 5, 7]), "b": np.array([0, 3])}
    sub = slice_weights(tiny_weights, tiny_spec, units)
    b_elems = np.array([0, 1, 6, 7])
    np.testing.assert_array_equal(sub["l1.weight"], tiny_weights["l1.weight"][[1, 5, 7], :])
    np.testing.assert_array_equal(sub["l2.weight"], tiny_weights["l2.weight"][b_elems][:, [1, 5, 7]])
    np.testing.assert_array_equal(sub["head.weight"], tiny_weights["head.weight"][:, b_elems])
    np.testing.assert_array_equal(sub["head.bias"], tiny_weights["head.bias"])


def test_slice_then_merge_is_the_identity(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    slots = [DeviceSlot(f"d{i}", 0.5) for i in range(4)]
    for t in range(3):
        plan = plan_round(tiny_spec, slots, t, 0.9, PlanConfig())
        updates = [
            SliceUpdate(d, t, plan.units(d), slice_weights(tiny_weights, tiny_spec, plan.units(d)), 10 + i)
            for i, d in enumerate(plan.windows)
        ]
        merged, report = merge_slices(tiny_weights, tiny_spec, updates, t)
        for name in tiny_weights:
            np.testing.assert_allclose(merged[name], tiny_weights[name], rtol=0, atol=1e-6)
        assert report.disagreement == pytest.approx(0.0, abs=1e-9)
        # Units are all covered, but a 2-D block of (b-window x a-window) per
        # device leaves cross terms between different devices' units untouched.
        assert 0.5 < report.coverage < 1.0


def test_merge_equals_plain_numpy(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    # Prepare: three devices with different windows return perturbed slices.
    rng = np.random.default_rng(1)
    slots = [DeviceSlot("x", 0.5), DeviceSlot("y", 0.25), DeviceSlot("z", 0.25)]
    plan = plan_round(tiny_spec, slots, 2, 0.9, PlanConfig(strategy=Strategy.FEDDROPOUT, seed=3))
    samples = {"x": 30, "y": 10, "z": 5}
    updates = []
    for d in plan.windows:
        sub = slice_weights(tiny_weights, tiny_spec, plan.units(d))
        sub = {n: a + rng.standard_normal(a.shape).astype(np.float32) for n, a in sub.items()}
        updates.append(SliceUpdate(d, 2, plan.units(d), sub, samples[d]))
    # Execute
    merged, report = merge_slices(tiny_weights, tiny_spec, updates, 2)
    # Assert: element by element, with index lists written out by hand.
    b_elems = {d: np.concatenate([[2 * u, 2 * u + 1] for u in plan.units(d)["b"]]) for d in plan.windows}
    for name in ("l2.weight", "head.bias", "l1.bias"):
        total = np.zeros(tiny_weights[name].shape)
        count = np.zeros(tiny_weights[name].shape)
        for up in updates:
            a_units = plan.units(up.device_id)["a"]
            if name == "l2.weight":
                rows, cols = b_elems[up.device_id], a_units
                for i, r in enumerate(rows):
                    for j, c in enumerate(cols):
                        total[r, c] += up.n_samples * up.weights[name][i, j]
                        count[r, c] += up.n_samples
            elif name == "l1.bias":
                for i, r in enumerate(a_units):
                    total[r] += up.n_samples * up.weights[name][i]
                    count[r] += up.n_samples
            else:
                total += up.n_samples * up.weights[name]
                count += up.n_samples
        expected = np.where(count > 0, total / np.maximum(count, 1), tiny_weights[name])
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-5)
    assert 0.0 < report.disagreement < 1.0
    assert report.merged == ("x", "y", "z")


def test_unheld_units_keep_their_values(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    units = {"a": np.array([0, 1]), "b": np.array([0])}
    sub = {n: a + 1.0 for n, a in slice_weights(tiny_weights, tiny_spec, units).items()}
    merged, _ = merge_slices(tiny_weights, tiny_spec, [SliceUpdate("d", 0, units, sub, 1)], 0)
    np.testing.assert_array_equal(merged["l1.weight"][2:], tiny_weights["l1.weight"][2:])
    np.testing.assert_allclose(merged["l1.weight"][:2], tiny_weights["l1.weight"][:2] + 1.0)


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda u: SliceUpdate(u.device_id, 9, u.units, u.weights, u.n_samples), "round"),
        (
            lambda u: SliceUpdate(u.device_id, 0, u.units, {**u.weights, "l1.bias": np.full(4, np.nan, np.float32)}, 5),
            "non-finite",
        ),
        (lambda u: SliceUpdate(u.device_id, 0, u.units, {**u.weights, "l1.bias": np.zeros(3, np.float32)}, 5), "shape"),
        (
            lambda u: SliceUpdate(u.device_id, 0, u.units, {k: v for k, v in u.weights.items() if k != "head.bias"}, 5),
            "missing",
        ),
        (lambda u: SliceUpdate(u.device_id, 0, u.units, u.weights, 0), "n_samples"),
    ],
)
def test_rejected_results_leave_the_model_untouched(
    tiny_spec: ModelSpec,
    tiny_weights: dict[str, np.ndarray],
    mutate,
    reason: str,  # type: ignore[no-untyped-def]
) -> None:
    units = {"a": np.array([0, 1, 2, 3]), "b": np.array([1, 2])}
    good = SliceUpdate("d", 0, units, {n: a * 3 for n, a in slice_weights(tiny_weights, tiny_spec, units).items()}, 5)
    acc = MergeAccumulator(tiny_weights, tiny_spec, 0)
    with pytest.raises(InvalidSlice, match=reason):
        acc.add(mutate(good))
    merged, report = acc.result()
    for name in tiny_weights:
        np.testing.assert_array_equal(merged[name], tiny_weights[name])
    assert report.merged == ()
    assert "d" in report.rejected


def test_duplicate_result_is_merged_once(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> None:
    units = {"a": np.arange(8), "b": np.arange(4)}
    up = SliceUpdate("d", 0, units, {n: a + 2 for n, a in tiny_weights.items()}, 5)
    other = SliceUpdate("e", 0, units, dict(tiny_weights), 5)
    merged, report = merge_slices(tiny_weights, tiny_spec, [up, up, other], 0)
    np.testing.assert_allclose(merged["l1.bias"], tiny_weights["l1.bias"] + 1.0, rtol=1e-6)
    assert report.merged == ("d", "e")
    assert "duplicate" in report.rejected["d"]
