"""Adaptive and scheduled overlap targets."""

from __future__ import annotations

import pytest

from msfusion.algorithm.overlap import OverlapConfig, OverlapMode, next_overlap
from msfusion.errors import ConfigError


def test_adaptive_overlap_follows_disagreement_within_bounds() -> None:
    cfg = OverlapConfig(initial=0.6, minimum=0.5, maximum=0.7, step=0.05, high=0.6, low=0.3)
    assert next_overlap(cfg, 1, 0.6, None) == 0.6
    assert next_overlap(cfg, 1, 0.6, 0.9) == pytest.approx(0.65)
    assert next_overlap(cfg, 1, 0.6, 0.1) == pytest.approx(0.55)
    assert next_overlap(cfg, 1, 0.6, 0.45) == pytest.approx(0.6)
    assert next_overlap(cfg, 1, 0.7, 0.9) == pytest.approx(0.7)
    assert next_overlap(cfg, 1, 0.5, 0.0) == pytest.approx(0.5)


def test_schedule_is_a_cosine_from_initial_to_minimum() -> None:
    cfg = OverlapConfig(mode=OverlapMode.SCHEDULE, initial=0.8, minimum=0.4, rounds=10)
    assert next_overlap(cfg, 0, 0.0, None) == pytest.approx(0.8)
    assert next_overlap(cfg, 5, 0.0, None) == pytest.approx(0.6)
    assert next_overlap(cfg, 10, 0.0, None) == pytest.approx(0.4)
    assert next_overlap(cfg, 50, 0.0, None) == pytest.approx(0.4)


def test_fixed_and_validation() -> None:
    assert next_overlap(OverlapConfig(mode=OverlapMode.FIXED, initial=0.7), 9, 0.1, 0.99) == 0.7
    with pytest.raises(ConfigError):
        OverlapConfig(initial=0.3, minimum=0.5)
