"""Round planning: coverage, overlap ratio, both shifts, wrap-around, unequal widths."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from msfusion.algorithm.planning import (
    DeviceSlot,
    PlanConfig,
    ShiftMode,
    Strategy,
    coverage,
    overlap_ratio_for,
    plan_round,
)
from msfusion.algorithm.spec import ModelSpec, TensorAxis, WidthGroup
from msfusion.errors import ConfigError


def ring_spec(*sizes: int) -> ModelSpec:
    shapes = {f"w{i}": (k,) for i, k in enumerate(sizes)}
    groups = tuple(WidthGroup(f"g{i}", k, (TensorAxis(f"w{i}", 0),)) for i, k in enumerate(sizes))
    return ModelSpec("rings", shapes, groups)


def devices(n: int, ratio: float) -> list[DeviceSlot]:
    return [DeviceSlot(f"d{i}", ratio) for i in range(n)]


@pytest.mark.parametrize("n,ratio", [(8, 0.25), (8, 0.5), (4, 0.25), (5, 0.3)])
def test_every_unit_trained_every_round(n: int, ratio: float) -> None:
    spec = ring_spec(32, 64, 128, 10)
    for t in range(12):
        plan = plan_round(spec, devices(n, ratio), t, 0.9, PlanConfig())
        for name, counts in coverage(spec, plan).items():
            assert counts.min() >= 1, (t, name, counts)


def test_equal_widths_are_spread_evenly_with_the_expected_overlap() -> None:
    spec = ring_spec(64)
    plan = plan_round(spec, devices(8, 0.25), 0, 0.9, PlanConfig())
    starts = [plan.windows[f"d{i}"]["g0"].start for i in range(8)]
    assert starts == [8 * i for i in range(8)]
    # Neighbouring windows of 16 units, 8 apart: overlap 8/16 = 1 - 1/(rN).
    a = set(plan.windows["d0"]["g0"].units)
    b = set(plan.windows["d1"]["g0"].units)
    assert len(a & b) / len(a) == pytest.approx(overlap_ratio_for(0.25, 8)) == pytest.approx(0.5)
    assert np.all(coverage(spec, plan)["g0"] == 2)


def test_round_shift_is_the_same_fraction_in_every_group() -> None:
    spec = ring_spec(16, 64)
    cfg = PlanConfig()  # s = 1 / min K = 1/16
    p0 = plan_round(spec, devices(4, 0.25), 0, 0.9, cfg)
    p3 = plan_round(spec, devices(4, 0.25), 3, 0.9, cfg)
    for d in ("d0", "d2"):
        assert (p3.windows[d]["g0"].start - p0.windows[d]["g0"].start) % 16 == 3
        assert (p3.windows[d]["g1"].start - p0.windows[d]["g1"].start) % 64 == 12


def test_units_mode_moves_every_group_by_one_unit() -> None:
    spec = ring_spec(16, 64)
    cfg = PlanConfig(shift_mode=ShiftMode.UNITS)
    p0 = plan_round(spec, devices(4, 0.25), 0, 0.9, cfg)
    p3 = plan_round(spec, devices(4, 0.25), 3, 0.9, cfg)
    assert (p3.windows["d1"]["g1"].start - p0.windows["d1"]["g1"].start) % 64 == 3


def test_windows_wrap_around() -> None:
    spec = ring_spec(10)
    plan = plan_round(spec, devices(2, 0.5), 7, 0.9, PlanConfig(round_shift=Fraction(1, 10)))
    w = plan.windows["d0"]["g0"]
    assert w.start == 7
    assert w.units == (0, 1, 7, 8, 9)  # 5 units from 7, wrapping


def test_participant_shift_off_puts_everyone_at_the_same_start() -> None:
    spec = ring_spec(32)
    plan = plan_round(spec, devices(4, 0.5), 5, 0.9, PlanConfig(participant_shift=False))
    assert len({plan.windows[f"d{i}"]["g0"].units for i in range(4)}) == 1


def test_unequal_widths_keep_coverage_even() -> None:
    spec = ring_spec(60, 120)
    slots = [DeviceSlot("big", 0.5), DeviceSlot("mid", 0.25), DeviceSlot("s1", 0.125), DeviceSlot("s2", 0.125)]
    for t in range(20):
        plan = plan_round(spec, slots, t, 0.95, PlanConfig())
        for counts in coverage(spec, plan).values():
            assert counts.min() >= 1
            assert counts.max() <= 2
        assert plan.windows["big"]["g0"].width == 30
        assert plan.windows["s1"]["g1"].width == 15


def test_overlap_target_sets_msfusion_widths() -> None:
    spec = ring_spec(64)
    # o = 0.5 with N = 8 -> r = 1 / (8 * 0.5) = 1/4, below the cap of 1/2.
    plan = plan_round(spec, devices(8, 0.5), 0, 0.5, PlanConfig())
    assert plan.windows["d0"]["g0"].width == 16
    # The cap wins when the target asks for more.
    plan = plan_round(spec, devices(8, 0.5), 0, 0.95, PlanConfig())
    assert plan.windows["d0"]["g0"].width == 32
    # Baselines ignore the overlap target.
    plan = plan_round(spec, devices(8, 0.5), 0, 0.5, PlanConfig(strategy=Strategy.HETEROFL))
    assert plan.windows["d3"]["g0"].units == tuple(range(32))


def test_baseline_plans() -> None:
    spec = ring_spec(16, 32)
    fedavg = plan_round(spec, devices(3, 0.25), 4, 0.5, PlanConfig(strategy=Strategy.FEDAVG))
    assert all(w.width == w_full for w, w_full in zip(fedavg.windows["d0"].values(), (16, 32)))
    rolex = plan_round(spec, devices(3, 0.25), 5, 0.5, PlanConfig(strategy=Strategy.FEDROLEX))
    assert rolex.windows["d0"]["g1"].start == rolex.windows["d2"]["g1"].start == 5
    drop_a = plan_round(spec, devices(3, 0.25), 1, 0.5, PlanConfig(strategy=Strategy.FEDDROPOUT))
    drop_b = plan_round(spec, devices(3, 0.25), 1, 0.5, PlanConfig(strategy=Strategy.FEDDROPOUT))
    drop_c = plan_round(spec, devices(3, 0.25), 2, 0.5, PlanConfig(strategy=Strategy.FEDDROPOUT))
    assert drop_a == drop_b
    assert drop_a.windows["d0"]["g1"].units != drop_c.windows["d0"]["g1"].units
    assert drop_a.windows["d0"]["g1"].width == 8


def test_plan_is_pure_and_validates() -> None:
    spec = ring_spec(16)
    assert plan_round(spec, devices(4, 0.5), 3, 0.7, PlanConfig()) == plan_round(
        spec, devices(4, 0.5), 3, 0.7, PlanConfig()
    )
    with pytest.raises(ConfigError):
        plan_round(spec, [], 0, 0.5, PlanConfig())
    with pytest.raises(ConfigError):
        plan_round(spec, [DeviceSlot("a", 0.5), DeviceSlot("a", 0.5)], 0, 0.5, PlanConfig())
    with pytest.raises(ConfigError):
        DeviceSlot("a", 0.0)
