"""Slicing and merging: round trip, plain-numpy equality, rejection leaves the model untouched."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from msfusion.algorithm.merging import (
    Aggregate,
    MergeAccumulator,
    MergeConfig,
    NormAction,
    SliceUpdate,
    merge_slices,
)
from msfusion.algorithm.planning import DeviceSlot, PlanConfig, Strategy, plan_round
from msfusion.algorithm.slicing import slice_weights
from msfusion.algorithm.spec import ModelSpec
from msfusion.errors import ConfigError, InvalidSlice


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


# --- Every index is validated before anything is accumulated -------------------------------------------------


def _slice(tiny_spec: ModelSpec, device: str, units, shift: float, n: int = 5):  # type: ignore[no-untyped-def]
    """A slice shaped for `units` (whatever they hold), its values the global ones plus `shift`."""
    widths = {g.name: 2 for g in tiny_spec.groups}  # a group it lacks: any width
    widths.update({g: len(np.asarray(u).reshape(-1)) for g, u in units.items() if g in widths})
    sub = {n_: np.zeros(tiny_spec.sub_shape(n_, widths), np.float32) + shift for n_ in tiny_spec.shapes}
    return SliceUpdate(device, 0, units, sub, n)


def _good_pair(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> list[SliceUpdate]:
    rng = np.random.default_rng(7)
    out = []
    for device, units in (
        ("g1", {"a": np.array([6, 7, 0, 1]), "b": np.array([3, 0])}),
        ("g2", {"a": np.arange(1, 5), "b": np.array([1, 2])}),
    ):
        sub = slice_weights(tiny_weights, tiny_spec, units)
        out.append(
            SliceUpdate(
                device, 0, units, {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in sub.items()}, 7
            )
        )
    return out


BAD_UNITS = [
    ({"a": np.array([0, 1, 1, 3]), "b": np.array([0, 1])}, "repeat"),
    ({"a": np.array([0, 1, 2, 3]), "b": np.array([2, 2])}, "repeat"),
    ({"a": np.array([-1, 0, 1, 2]), "b": np.array([0, 1])}, "negative"),
    ({"a": np.array([0, 1, 2, 3]), "b": np.array([-4, 1])}, "negative"),
    ({"a": np.array([0, 1, 2, 3]), "b": np.array([2, 3, 4])}, "out of range"),
    ({"a": np.array([5, 6, 7, 8]), "b": np.array([0, 1])}, "out of range"),
    ({"a": np.array([0, 1, 2, 3], dtype=np.uint8), "b": np.array([4], dtype=np.uint64)}, "out of range"),
    ({"a": np.array([0.0, 1.0, 2.0, 3.0]), "b": np.array([0, 1])}, "integers"),
    ({"a": np.array([True, False, True]), "b": np.array([0, 1])}, "integers"),
    ({"a": np.array([[0, 1], [2, 3]]), "b": np.array([0, 1])}, "1-D"),
    ({"a": [0, 1, 2, 3], "b": np.array([0, 1])}, "numpy array"),
    ({"a": np.array([], dtype=np.int64), "b": np.array([0, 1])}, "no units"),
    ({"a": np.array([0, 1, 2, 3])}, "missing \\['b'\\]"),
    ({"a": np.array([0, 1, 2, 3]), "b": np.array([0, 1]), "c": np.array([0])}, "unexpected \\['c'\\]"),
]


@pytest.mark.parametrize("config", [MergeConfig(norm_bound=0), MergeConfig()], ids=["streaming", "kept"])
@pytest.mark.parametrize("units,reason", BAD_UNITS)
def test_bad_unit_indices_are_rejected_before_anything_is_accumulated(
    tiny_spec: ModelSpec,
    tiny_weights: dict[str, np.ndarray],
    units,  # type: ignore[no-untyped-def]
    reason: str,
    config: MergeConfig,
) -> None:
    # Prepare: two good slices, and a bad one shaped for its (bad) units, so only the index check can catch it
    good = _good_pair(tiny_spec, tiny_weights)
    bad = _slice(tiny_spec, "bad", units, 100.0)
    before = {k: v.copy() for k, v in tiny_weights.items()}
    expected, expected_report = merge_slices(tiny_weights, tiny_spec, good, 0, config)
    # Execute: the bad slice between the good ones, through the accumulator and through merge_slices
    acc = MergeAccumulator(tiny_weights, tiny_spec, 0, config)
    acc.add(good[0])
    with pytest.raises(InvalidSlice, match=reason):
        acc.add(bad)
    acc.add(good[1])
    merged, report = acc.result()
    merged_again, report_again = merge_slices(tiny_weights, tiny_spec, [good[0], bad, good[1]], 0, config)
    # Assert: byte-identical to the merge of the good slices alone; the model itself untouched
    for name in expected:
        assert merged[name].tobytes() == expected[name].tobytes(), name
        assert merged_again[name].tobytes() == expected[name].tobytes(), name
        assert tiny_weights[name].tobytes() == before[name].tobytes(), name
    assert report.merged == report_again.merged == expected_report.merged == ("g1", "g2")
    assert report.disagreement == expected_report.disagreement and report.coverage == expected_report.coverage
    assert "bad" in report.rejected and "bad" in report_again.rejected


@pytest.mark.parametrize(
    "values,reason",
    [
        (lambda a: a.astype(np.int32), "floating-point"),
        (lambda a: a.astype(np.complex64), "floating-point"),
        (lambda a: a.astype(object), "floating-point"),
        (lambda a: a.tolist(), "floating-point"),
        (lambda a: a.reshape(-1), "shape"),
        (lambda a: np.full(a.shape, np.inf, np.float32), "non-finite"),
    ],
    ids=["int32", "complex", "object", "list", "flattened", "inf"],
)
def test_values_of_a_wrong_dtype_or_shape_are_rejected_and_change_nothing(
    tiny_spec: ModelSpec,
    tiny_weights: dict[str, np.ndarray],
    values,  # type: ignore[no-untyped-def]
    reason: str,
) -> None:
    # Prepare: the bad slice's last tensor is wrong, so a half-done accumulation would show in the others
    good = _good_pair(tiny_spec, tiny_weights)
    units = {"a": np.array([0, 1, 2, 3]), "b": np.array([1, 2])}
    sub = {k: v + 9.0 for k, v in slice_weights(tiny_weights, tiny_spec, units).items()}
    last = list(tiny_spec.shapes)[-2]  # head.weight: split on group b
    bad = SliceUpdate("bad", 0, units, {**sub, last: values(sub[last])}, 5)
    expected, _ = merge_slices(tiny_weights, tiny_spec, good, 0)
    # Execute
    acc = MergeAccumulator(tiny_weights, tiny_spec, 0, MergeConfig(norm_bound=0))
    acc.add(good[0])
    with pytest.raises(InvalidSlice, match=reason):
        acc.add(bad)
    acc.add(good[1])
    merged, report = acc.result()
    # Assert
    for name in expected:
        assert merged[name].tobytes() == expected[name].tobytes(), name
    assert report.merged == ("g1", "g2") and reason.split()[0] in report.rejected["bad"]


@pytest.mark.parametrize("n_samples", [2.5, float("nan"), True, "64"])
def test_a_sample_count_that_is_not_an_integer_is_rejected(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray], n_samples: object
) -> None:
    units = {"a": np.arange(4), "b": np.arange(2)}
    bad = SliceUpdate("bad", 0, units, slice_weights(tiny_weights, tiny_spec, units), n_samples)  # type: ignore[arg-type]
    acc = MergeAccumulator(tiny_weights, tiny_spec, 0)
    with pytest.raises(InvalidSlice, match="n_samples must be an integer"):
        acc.add(bad)
    merged, report = acc.result()
    assert report.merged == () and all(merged[n].tobytes() == tiny_weights[n].tobytes() for n in merged)


# --- Poisoning bounds -----------------------------------------------------------------------------------------


def _full_round(
    tiny_weights: dict[str, np.ndarray], scales: list[float], samples: list[int] | None = None
) -> list[SliceUpdate]:
    """Devices holding the whole model, each returning global + scale x (its own random unit-RMS update)."""
    rng = np.random.default_rng(11)
    units = {"a": np.arange(8), "b": np.arange(4)}
    out = []
    for i, scale in enumerate(scales):
        update = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tiny_weights.items()}
        weights = {k: tiny_weights[k] + np.float32(scale) * update[k] for k in tiny_weights}
        out.append(SliceUpdate(f"d{i}", 0, units, weights, (samples or [10] * len(scales))[i]))
    return out


def _rms(update: SliceUpdate, tiny_weights: dict[str, np.ndarray]) -> float:
    diffs = np.concatenate([(update.weights[k].astype(np.float64) - tiny_weights[k]).ravel() for k in tiny_weights])
    return float(np.sqrt(np.mean(diffs**2)))


def test_the_update_norm_bound_is_on_by_default_and_rejects_a_boosted_slice(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]
) -> None:
    # Prepare: three honest devices (update norms within 3x of each other) and one 50x boosted
    updates = _full_round(tiny_weights, [0.01, 0.02, 0.03, 0.5])
    # Execute
    merged, report = merge_slices(tiny_weights, tiny_spec, updates, 0)
    honest, honest_report = merge_slices(tiny_weights, tiny_spec, updates[:3], 0, MergeConfig(norm_bound=0))
    # Assert: the boosted slice is out with its reason; the rest is byte-identical to the honest three's merge
    assert report.merged == ("d0", "d1", "d2")
    assert "update norm" in report.rejected["d3"] and "median" in report.rejected["d3"], report.rejected
    for name in merged:
        assert merged[name].tobytes() == honest[name].tobytes()
    assert report.disagreement == honest_report.disagreement
    norms = [_rms(u, tiny_weights) for u in updates]
    assert report.update_norms == pytest.approx(dict(zip(("d0", "d1", "d2", "d3"), norms)), rel=1e-6)


def test_the_engine_config_merges_with_the_mean_and_the_10x_reject_bound_by_default() -> None:
    from msfusion.models.config import ModelConfig
    from msfusion.recipe import EngineConfig

    merge = EngineConfig(model=ModelConfig(arch="cnn")).merge
    assert merge == MergeConfig(norm_bound=10.0, norm_action=NormAction.REJECT, aggregate=Aggregate.MEAN)
    assert merge.keeps_slices and not MergeConfig(norm_bound=0).keeps_slices


def test_honest_spread_fewer_than_three_slices_or_a_bound_of_zero_reject_nothing(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]
) -> None:
    spread = _full_round(tiny_weights, [0.01, 0.02, 0.05, 0.09])  # 9x the smallest, 2.6x the median
    pair = _full_round(tiny_weights, [0.01, 5.0])
    boosted = _full_round(tiny_weights, [0.01, 0.01, 0.01, 5.0])
    assert merge_slices(tiny_weights, tiny_spec, spread, 0)[1].merged == ("d0", "d1", "d2", "d3")
    assert merge_slices(tiny_weights, tiny_spec, pair, 0)[1].merged == ("d0", "d1")
    off = merge_slices(tiny_weights, tiny_spec, boosted, 0, MergeConfig(norm_bound=0))[1]
    assert off.merged == ("d0", "d1", "d2", "d3") and not off.rejected and not off.clipped


def test_clip_scales_a_boosted_update_down_to_the_bound(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]
) -> None:
    # Prepare
    updates = _full_round(tiny_weights, [0.01, 0.02, 0.03, 0.5], samples=[10, 20, 30, 40])
    config = MergeConfig(norm_bound=4.0, norm_action=NormAction.CLIP)
    # Execute
    merged, report = merge_slices(tiny_weights, tiny_spec, updates, 0, config)
    # Assert: plain numpy: the boosted update scaled to 4x the median norm, then the sample-weighted mean
    norms = [_rms(u, tiny_weights) for u in updates]
    bound = 4.0 * float(np.median(norms))
    assert report.merged == ("d0", "d1", "d2", "d3") and not report.rejected
    assert set(report.clipped) == {"d3"} and "update norm" in report.clipped["d3"]
    for name, old in tiny_weights.items():
        old64 = old.astype(np.float64)
        values = [u.weights[name].astype(np.float64) for u in updates]
        values[3] = old64 + bound / norms[3] * (values[3] - old64)
        expected = sum(n * v for n, v in zip([10, 20, 30, 40], values)) / 100.0
        np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)
    clipped = np.concatenate(
        [(bound / norms[3] * (updates[3].weights[n] - old)).ravel() for n, old in tiny_weights.items()]
    )
    clipped_rms = float(np.sqrt(np.mean(clipped.astype(np.float64) ** 2)))
    assert clipped_rms == pytest.approx(bound, rel=1e-4)


def _holders_round(tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]) -> list[SliceUpdate]:
    """Seven devices with windows of different widths and starts (elements held by 0 to 7), unequal samples."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(7):
        units = {"a": (np.arange(i + 2) + i) % 8, "b": (np.arange(1 + i % 4) + i) % 4}
        sub = slice_weights(tiny_weights, tiny_spec, units)
        out.append(
            SliceUpdate(
                f"d{i}",
                0,
                units,
                {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in sub.items()},
                5 + 20 * i,
            )
        )
    return out


def _per_element(
    tiny_spec: ModelSpec,
    tiny_weights: dict[str, np.ndarray],
    updates: list[SliceUpdate],
    statistic: Callable[[list[float]], float],
) -> dict[str, np.ndarray]:
    """Plain numpy, element by element: `statistic(list of the holders' values)`, or the old value when unheld."""
    out = {}
    for name, old in tiny_weights.items():
        held: dict[tuple[int, ...], list[float]] = {}
        for up in updates:
            index = tiny_spec.tensor_index(name, up.units)
            axes = [index.get(axis, np.arange(n)) for axis, n in enumerate(old.shape)]
            for sub_pos in np.ndindex(*up.weights[name].shape):
                full_pos = tuple(int(axes[a][p]) for a, p in enumerate(sub_pos))
                held.setdefault(full_pos, []).append(float(up.weights[name][sub_pos]))
        expected = old.astype(np.float64).copy()
        for pos, values in held.items():
            expected[pos] = statistic(values)
        out[name] = expected
    return out


def _trimmed(values: list[float], trim: float = 0.25) -> float:
    cut = int(np.floor(trim * len(values)))
    ordered = sorted(values)
    return float(np.mean(ordered[cut : len(ordered) - cut]))


@pytest.mark.parametrize(
    "config,statistic",
    [
        (MergeConfig(norm_bound=0, aggregate=Aggregate.TRIMMED_MEAN, trim=0.25), _trimmed),
        (MergeConfig(norm_bound=0, aggregate=Aggregate.MEDIAN), lambda v: float(np.median(v))),
        (MergeConfig(norm_bound=0, aggregate=Aggregate.TRIMMED_MEAN, trim=0.0), lambda v: float(np.mean(v))),
    ],
    ids=["trimmed-mean", "median", "trim-0-is-the-unweighted-mean"],
)
def test_robust_aggregates_equal_plain_numpy_over_each_elements_holders(
    tiny_spec: ModelSpec,
    tiny_weights: dict[str, np.ndarray],
    config: MergeConfig,
    statistic: Callable[[list[float]], float],
) -> None:
    # Prepare
    updates = _holders_round(tiny_spec, tiny_weights)
    # Execute
    merged, report = merge_slices(tiny_weights, tiny_spec, updates, 0, config)
    # Assert
    expected = _per_element(tiny_spec, tiny_weights, updates, statistic)
    for name in expected:
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-5, atol=1e-6)
    mean, mean_report = merge_slices(tiny_weights, tiny_spec, updates, 0, MergeConfig(norm_bound=0))
    assert report.merged == mean_report.merged and report.coverage == mean_report.coverage
    assert report.disagreement == pytest.approx(mean_report.disagreement)  # measured on the weighted statistics
    assert not np.allclose(merged["head.bias"], mean["head.bias"])


def test_the_median_outvotes_a_poisoned_holder_the_mean_does_not(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]
) -> None:
    # Prepare: five devices on the whole model; d4 returns -1000x its update, claiming many samples
    updates = _full_round(tiny_weights, [0.01] * 4 + [-10.0], samples=[10, 10, 10, 10, 1000])
    honest, _ = merge_slices(tiny_weights, tiny_spec, updates[:4], 0, MergeConfig(norm_bound=0))
    # Execute
    mean, _ = merge_slices(tiny_weights, tiny_spec, updates, 0, MergeConfig(norm_bound=0))
    median, _ = merge_slices(tiny_weights, tiny_spec, updates, 0, MergeConfig(norm_bound=0, aggregate=Aggregate.MEDIAN))
    trimmed, _ = merge_slices(
        tiny_weights, tiny_spec, updates, 0, MergeConfig(norm_bound=0, aggregate=Aggregate.TRIMMED_MEAN, trim=0.2)
    )
    # Assert: every element stays within the honest updates' reach under the robust aggregates
    for name, old in tiny_weights.items():
        assert np.max(np.abs(mean[name] - old)) > 1.0
        for robust in (median, trimmed):
            assert np.max(np.abs(robust[name] - honest[name])) < 0.1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"norm_bound": 0.5}, "norm_bound"),
        ({"norm_bound": float("inf")}, "norm_bound"),
        ({"trim": 0.5}, "trim"),
        ({"trim": -0.1}, "trim"),
        ({"staleness_exponent": -1.0}, "staleness_exponent"),
        ({"max_staleness": -1}, "max_staleness"),
    ],
)
def test_a_bad_merge_config_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MergeConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("aggregate", list(Aggregate))
def test_unheld_elements_keep_their_values_under_every_aggregate(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray], aggregate: Aggregate
) -> None:
    # Prepare: three devices on the same corner of the model; the rest of it is held by no one
    units = {"a": np.array([0, 1, 2]), "b": np.array([0])}
    sub = slice_weights(tiny_weights, tiny_spec, units)
    updates = [SliceUpdate(f"d{i}", 0, units, {k: v + float(i) for k, v in sub.items()}, 5) for i in range(3)]
    # Execute
    merged, _ = merge_slices(tiny_weights, tiny_spec, updates, 0, MergeConfig(norm_bound=0, aggregate=aggregate))
    # Assert: held elements move by the holders' middle (+1 for every aggregate here), unheld ones not at all
    np.testing.assert_array_equal(merged["l1.weight"][3:], tiny_weights["l1.weight"][3:])
    np.testing.assert_array_equal(merged["l2.bias"][2:], tiny_weights["l2.bias"][2:])
    np.testing.assert_allclose(merged["l1.weight"][:3], tiny_weights["l1.weight"][:3] + 1.0, rtol=1e-6)
    assert all(np.all(np.isfinite(a)) for a in merged.values())


def _reference_merge(spec: ModelSpec, weights: dict[str, np.ndarray], updates: list[SliceUpdate]):  # type: ignore[no-untyped-def]
    """The merge written out in float64 with fancy indexing (the pre-block implementation's arithmetic)."""
    from msfusion.algorithm.indexing import open_index

    merged, var_total, energy_total = {}, 0.0, 0.0
    for name, old in weights.items():
        total, square, wsum, holders = (np.zeros(old.shape) for _ in range(4))
        for u in updates:
            at = open_index(old.shape, spec.tensor_index(name, u.units))
            values = u.weights[name].astype(np.float64)
            total[at] += u.n_samples * values
            square[at] += u.n_samples * values * values
            wsum[at] += u.n_samples
            holders[at] += 1
        held = wsum > 0
        mean = np.where(held, total / np.where(held, wsum, 1), old)
        merged[name] = mean
        shared = holders >= 2
        var = np.maximum(square[shared] / wsum[shared] - mean[shared] ** 2, 0.0)
        var_total += float(var.sum())
        energy_total += float((var + (mean[shared] - old[shared]) ** 2).sum())
    return merged, var_total / energy_total if energy_total else 0.0


@pytest.mark.parametrize(
    "arch,devices,round_idx",
    [("cnn", 8, 3), ("cnn", 5, 7), ("charlm", 6, 2)],
    ids=["cnn-8", "cnn-5-wrapping", "charlm-6"],
)
def test_block_merge_equals_a_float64_reference_on_wrap_around_windows(arch: str, devices: int, round_idx: int) -> None:
    # Prepare: a real model's spec (conv kernels: grid smaller than the tensor; the LM: unit sizes > 1 and
    # tensors with two grouped axes), msfusion windows shifted so that some wrap around their group's end.
    from msfusion.models.config import ModelConfig
    from msfusion.models.registry import model_spec

    config = ModelConfig(arch="cnn", channels=(8, 16, 32)) if arch == "cnn" else ModelConfig(arch="charlm")
    spec = model_spec(config)
    rng = np.random.default_rng(round_idx)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in spec.shapes.items()}
    slots = [DeviceSlot(f"d{i}", 0.4) for i in range(devices)]
    plan = plan_round(spec, slots, round_idx, 0.6, PlanConfig())
    wrapped = [
        d for d in plan.windows for g, u in plan.units(d).items() if len(u) > 1 and np.any(np.diff(np.sort(u)) > 1)
    ]
    assert wrapped, "the case must hold at least one window that wraps around"
    updates = []
    for i, d in enumerate(plan.windows):
        sub = slice_weights(weights, spec, plan.units(d))
        sub = {n: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) for n, a in sub.items()}
        updates.append(SliceUpdate(d, round_idx, plan.units(d), sub, 10 + 3 * i))
    # Execute
    merged, report = merge_slices(weights, spec, updates, round_idx, MergeConfig(norm_bound=0))
    expected, disagreement = _reference_merge(spec, weights, updates)
    # Assert: float32 sums of updates against float64 sums of values, to float32 tolerance
    for name in weights:
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert report.disagreement == pytest.approx(disagreement, rel=1e-4)
    assert report.merged == tuple(plan.windows)


def test_a_late_slice_adds_its_update_from_its_base_with_the_staleness_weight(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]
) -> None:
    # Prepare: round 3's model moved on from round 1's; one fresh slice of round 3, one slice trained
    # for round 1 from round 1's model (its base), two rounds late.
    rng = np.random.default_rng(5)
    then = {n: a + rng.standard_normal(a.shape).astype(np.float32) for n, a in tiny_weights.items()}
    now = tiny_weights
    fresh_units = {"a": np.array([0, 1, 2, 3]), "b": np.array([0, 1])}
    late_units = {"a": np.array([2, 3, 4, 5]), "b": np.array([1, 2])}
    fresh = {n: a + 0.5 for n, a in slice_weights(now, tiny_spec, fresh_units).items()}
    base = slice_weights(then, tiny_spec, late_units)
    late = {n: a - 1.0 for n, a in base.items()}  # its update: -1 everywhere it held
    config = MergeConfig(norm_bound=0, staleness_exponent=0.5, max_staleness=2)
    # Execute
    merged, report = merge_slices(
        now,
        tiny_spec,
        [
            SliceUpdate("fresh", 3, fresh_units, fresh, 10),
            SliceUpdate("late", 1, late_units, late, 10, base=base),
        ],
        3,
        config,
    )
    # Assert: element by element, the documented rule: old + sum(w u) / sum(w), w = n (1 + s)^-0.5.
    w_late = 10 * 3**-0.5
    assert config.staleness_weight(2) == pytest.approx(3**-0.5)
    assert report.merged == ("fresh", "late")
    bias = merged["l1.bias"]
    np.testing.assert_allclose(bias[[0, 1]], now["l1.bias"][[0, 1]] + 0.5, rtol=1e-6)
    np.testing.assert_allclose(
        bias[[2, 3]], now["l1.bias"][[2, 3]] + (10 * 0.5 + w_late * -1.0) / (10 + w_late), rtol=1e-5
    )
    np.testing.assert_allclose(bias[[4, 5]], now["l1.bias"][[4, 5]] - 1.0, rtol=1e-6)
    np.testing.assert_array_equal(bias[6:], now["l1.bias"][6:])


def test_a_late_slice_without_its_base_or_beyond_max_staleness_is_refused(
    tiny_spec: ModelSpec, tiny_weights: dict[str, np.ndarray]
) -> None:
    units = {"a": np.array([0, 1]), "b": np.array([0])}
    base = slice_weights(tiny_weights, tiny_spec, units)
    config = MergeConfig(norm_bound=0, max_staleness=2)
    accumulator = MergeAccumulator(tiny_weights, tiny_spec, 5, config)
    with pytest.raises(InvalidSlice, match="for round 4, merging round 5"):
        accumulator.add(SliceUpdate("a", 4, units, base, 3))  # no base: its update has no start
    with pytest.raises(InvalidSlice, match="3 rounds late"):
        accumulator.add(SliceUpdate("b", 2, units, base, 3, base=base))
    with pytest.raises(InvalidSlice, match="for round 6"):
        accumulator.add(SliceUpdate("c", 6, units, base, 3, base=base))  # from the future
    bad = {**base, "l1.bias": np.full_like(base["l1.bias"], np.nan)}
    with pytest.raises(InvalidSlice, match="base has non-finite"):
        accumulator.add(SliceUpdate("d", 4, units, base, 3, base=bad))
    merged, report = accumulator.result()
    assert report.merged == ()
    assert all(np.array_equal(merged[n], tiny_weights[n]) for n in tiny_weights)
