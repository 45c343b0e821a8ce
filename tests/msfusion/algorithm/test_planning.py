"""Round planning: coverage, overlap ratio, both shifts, wrap-around, unequal widths."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from msfusion.algorithm.planning import (
    DeviceSlot,
    PlanConfig,
    ShiftMode,
    SplitPlan,
    Strategy,
    coverage,
    effective_ratios,
    holder_span,
    overlap_ratio_for,
    plan_round,
)
from msfusion.algorithm.spec import ModelSpec, TensorAxis, WidthGroup
from msfusion.errors import ConfigError
from msfusion.models.registry import model_spec
from msfusion.recipe import ModelConfig


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


# Capped overlap (PlanConfig.capped_overlap): the overlap target under memory caps.


def cnn_spec() -> ModelSpec:
    return model_spec(ModelConfig(arch="cnn", channels=(32, 64, 128)))


def holders_and_coverage(spec: ModelSpec, plan: SplitPlan) -> tuple[float, float]:
    """Mean holders per covered unit and the covered share, over all units of all groups."""
    counts = np.concatenate(list(coverage(spec, plan).values()))
    return float(counts[counts > 0].mean()), float((counts > 0).mean())


def test_holder_span_formula() -> None:
    quarter = [Fraction(1, 4)] * 8  # total 2: natural overlap 1/2
    assert holder_span(quarter, 0.3) == 1
    assert holder_span(quarter, 0.5) == 1
    assert holder_span(quarter, 0.6) == Fraction(4, 5)  # 2 * (1 - 0.6)
    assert holder_span(quarter, 0.8) == Fraction(2, 5)
    assert holder_span(quarter, 0.9) == Fraction(1, 4)  # clamped at min r_i
    assert holder_span(quarter, 1.0) == Fraction(1, 4)
    # Widths that fill less than the ring: natural overlap 0, any o > 0 squeezes.
    assert holder_span([Fraction(1, 8)] * 4, 0.0) == 1
    assert holder_span([Fraction(1, 8)] * 4, 0.5) == Fraction(1, 4)
    assert holder_span([Fraction(1, 2), Fraction(1, 8)], 0.9) == Fraction(1, 8)


def test_capped_overlap_spends_the_target_on_holders() -> None:
    spec = cnn_spec()
    slots = devices(8, 0.25)
    on, off = PlanConfig(capped_overlap=True), PlanConfig()
    for t in (0, 5):
        # Off: under the caps the target changes nothing.
        plans_off = [plan_round(spec, slots, t, o, off) for o in (0.6, 0.8, 0.9)]
        assert all(p.windows == plans_off[0].windows for p in plans_off)
        # On: the windows keep their widths, but more devices share fewer units.
        figures = [holders_and_coverage(spec, plan_round(spec, slots, t, o, on)) for o in (0.5, 0.6, 0.7, 0.8, 0.9)]
        holders = [h for h, _ in figures]
        covered = [c for _, c in figures]
        assert holders == sorted(holders) and holders[-1] > 2 * holders[0]
        assert covered == sorted(covered, reverse=True) and covered[-1] < 0.6
        plan = plan_round(spec, slots, t, 0.9, on)
        assert plan.widths("d3") == {"conv0": 8, "conv1": 16, "conv2": 32}


NATURAL_CASES = {
    "equal": devices(8, 0.25),  # natural overlap 1 - 1/(8/4) = 1/2
    "mixed": [DeviceSlot("h0", 0.5), DeviceSlot("h1", 0.5)] + [DeviceSlot(f"q{i}", 0.25) for i in range(4)],
    "unequal": [DeviceSlot("big", 0.5), DeviceSlot("mid", 0.25), DeviceSlot("s1", 0.125), DeviceSlot("s2", 0.125)],
}


@pytest.mark.parametrize(
    "case,o", [("equal", 0.0), ("equal", 0.3), ("equal", 0.5), ("mixed", 0.0), ("mixed", 0.3), ("unequal", 0.0)]
)
def test_capped_overlap_at_or_below_the_natural_overlap_is_todays_plan(case: str, o: float) -> None:
    spec = cnn_spec()
    slots = NATURAL_CASES[case]
    ratios = effective_ratios(slots, o, Strategy.MSFUSION)
    assert o <= max(0, 1 - 1 / sum(ratios))
    assert holder_span(ratios, o) == 1
    for shift_mode in ShiftMode:
        for t in (0, 3, 17):
            on = plan_round(spec, slots, t, o, PlanConfig(shift_mode=shift_mode, capped_overlap=True))
            assert on == plan_round(spec, slots, t, o, PlanConfig(shift_mode=shift_mode))


def test_capped_overlap_leaves_other_strategies_alone() -> None:
    spec = cnn_spec()
    slots = devices(8, 0.25)
    # Baselines and unsplit plans ignore the flag at any target.
    for strategy in (Strategy.FEDROLEX, Strategy.HETEROFL, Strategy.FEDDROPOUT, Strategy.FEDAVG):
        on = plan_round(spec, slots, 4, 0.9, PlanConfig(strategy=strategy, capped_overlap=True))
        assert on == plan_round(spec, slots, 4, 0.9, PlanConfig(strategy=strategy))
    off_shift = PlanConfig(participant_shift=False)
    assert plan_round(spec, slots, 4, 0.9, off_shift) == plan_round(
        spec, slots, 4, 0.9, PlanConfig(participant_shift=False, capped_overlap=True)
    )


@pytest.mark.parametrize("o", [0.6, 0.7, 0.85, 0.9])
@pytest.mark.parametrize("shift_mode", list(ShiftMode))
@pytest.mark.parametrize("round_shift", [None, Fraction(0)])
def test_capped_overlap_keeps_long_run_coverage_even(
    o: float, shift_mode: ShiftMode, round_shift: Fraction | None
) -> None:
    spec = cnn_spec()
    cfg = PlanConfig(shift_mode=shift_mode, round_shift=round_shift, capped_overlap=True)
    mixed = [DeviceSlot(f"q{i}", 0.25) for i in range(5)] + [DeviceSlot("h", 0.5), DeviceSlot("e", 0.125)]
    for slots in (devices(8, 0.25), mixed):
        span = holder_span(effective_ratios(slots, o, Strategy.MSFUSION), o)
        assert span < 1
        totals = {g.name: np.zeros(g.size, dtype=np.int64) for g in spec.groups}
        for t in range(128):
            for name, counts in coverage(spec, plan_round(spec, slots, t, o, cfg)).items():
                totals[name] += counts
            if t + 1 == math.ceil(1 / span):
                # The span has gone once around the ring: every unit came in turn.
                assert all(held.min() >= 1 for held in totals.values()), (o, t)
        for name, held in totals.items():
            mean = held.mean()
            assert held.min() >= 0.75 * mean and held.max() <= 1.25 * mean, (o, name, held.min(), held.max(), mean)


def test_capped_overlap_plans_are_pure() -> None:
    spec = cnn_spec()
    cfg = PlanConfig(capped_overlap=True)
    for t in (0, 7, 100):
        a = plan_round(spec, devices(8, 0.25), t, 0.8, cfg)
        b = plan_round(spec, devices(8, 0.25), t, 0.8, PlanConfig(capped_overlap=True))
        assert a == b
    # The span moves on every round.
    p0, p1 = (plan_round(spec, devices(8, 0.25), t, 0.8, cfg) for t in (0, 1))
    assert p0.windows["d0"]["conv0"].start != p1.windows["d0"]["conv0"].start
