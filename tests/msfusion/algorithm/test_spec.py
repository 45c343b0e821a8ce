"""Width-group spec: validation, sub-shapes, parameter counts, budgets."""

from __future__ import annotations

import pytest

from msfusion.algorithm.spec import (
    ModelSpec,
    TensorAxis,
    WidthGroup,
    ratio_for_budget,
    widths_for_ratio,
)
from msfusion.errors import ConfigError


def test_sub_shapes_and_param_count(tiny_spec: ModelSpec) -> None:
    widths = {"a": 4, "b": 2}
    assert tiny_spec.sub_shape("l2.weight", widths) == (4, 4)
    assert tiny_spec.sub_shape("head.weight", widths) == (2, 4)
    assert tiny_spec.param_count() == 8 * 3 + 8 + 64 + 8 + 16 + 2
    assert tiny_spec.param_count(widths) == 4 * 3 + 4 + 16 + 4 + 8 + 2


def test_axis_size_mismatch_is_rejected() -> None:
    with pytest.raises(ConfigError, match="needs"):
        ModelSpec("bad", {"w": (6, 2)}, (WidthGroup("g", 4, (TensorAxis("w", 0),)),))


def test_axis_in_two_groups_is_rejected() -> None:
    with pytest.raises(ConfigError, match="two groups"):
        ModelSpec(
            "bad",
            {"w": (4, 2)},
            (WidthGroup("g", 4, (TensorAxis("w", 0),)), WidthGroup("h", 4, (TensorAxis("w", 0),))),
        )


def test_ratio_for_budget_is_largest_fitting(tiny_spec: ModelSpec) -> None:
    full = tiny_spec.param_count()
    for budget in (1.0, 0.5, 0.25):
        r = ratio_for_budget(tiny_spec, budget)
        assert tiny_spec.param_count(widths_for_ratio(tiny_spec, r)) <= budget * full
        bigger = min(1.0, r + 1 / 1024)
        if bigger > r and widths_for_ratio(tiny_spec, bigger) != widths_for_ratio(tiny_spec, r):
            assert tiny_spec.param_count(widths_for_ratio(tiny_spec, bigger)) > budget * full
    assert ratio_for_budget(tiny_spec, 1.0) == 1.0
