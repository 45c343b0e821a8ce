"""Adaptive model overlapping (msfusion.md, section 3): the overlap target per round (pure)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from msfusion.errors import ConfigError


class OverlapMode(str, enum.Enum):
    """How the overlap target moves over rounds."""

    ADAPTIVE = "adaptive"  # driven by the measured disagreement on shared units
    SCHEDULE = "schedule"  # cosine from o_0 to o_min over `rounds`
    FIXED = "fixed"  # o_0 every round (the ablation)


@dataclass(frozen=True)
class OverlapConfig:
    """Overlap knobs.

    Attributes:
        mode: adaptive, schedule or fixed.
        initial: o_0. Widths follow k = min(k_max, ceil(K / (N (1 - o)))), so an
            o_0 at or above the budget's natural overlap 1 - 1/(r_max N) starts
            every device at the largest width it affords.
        minimum, maximum: bounds of o_t.
        step: change per round in adaptive mode.
        high, low: disagreement thresholds (see MergeReport.disagreement):
            above `high` the overlap grows, below `low` it shrinks.
        rounds: horizon of the cosine schedule.
    """

    mode: OverlapMode = OverlapMode.ADAPTIVE
    initial: float = 0.9
    minimum: float = 0.5
    maximum: float = 0.95
    step: float = 0.05
    high: float = 0.6
    low: float = 0.3
    rounds: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.minimum <= self.maximum < 1.0:
            raise ConfigError(f"need 0 <= minimum <= maximum < 1, got {self.minimum}, {self.maximum}")
        if not self.minimum <= self.initial <= self.maximum:
            raise ConfigError(f"initial overlap {self.initial} outside [{self.minimum}, {self.maximum}]")
        if not 0.0 <= self.low <= self.high:
            raise ConfigError(f"need 0 <= low <= high, got {self.low}, {self.high}")
        if self.step < 0 or self.rounds < 1:
            raise ConfigError("step must be >= 0 and rounds >= 1")


def next_overlap(config: OverlapConfig, round_idx: int, current: float, disagreement: float | None) -> float:
    """The overlap target for round `round_idx`.

    Args:
        config: overlap knobs.
        round_idx: the round being planned.
        current: last round's target (config.initial before round 0).
        disagreement: measured at the last merge, None before the first.

    Returns:
        o_t within [config.minimum, config.maximum].
    """
    if config.mode is OverlapMode.FIXED:
        return config.initial
    if config.mode is OverlapMode.SCHEDULE:
        progress = min(1.0, round_idx / config.rounds)
        return config.minimum + (config.initial - config.minimum) * 0.5 * (1 + math.cos(math.pi * progress))
    if disagreement is None:
        return current
    if disagreement > config.high:
        current += config.step
    elif disagreement < config.low:
        current -= config.step
    return min(config.maximum, max(config.minimum, current))
