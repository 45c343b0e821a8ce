"""Round planning: which units of every width group each device trains (pure, torch-free).

`plan_round` is a pure function of (spec, devices, round, overlap, config): the
same inputs always give the same plan (msfusion.md, sections 2 and 3).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from msfusion.algorithm.spec import IndexArray, ModelSpec
from msfusion.errors import ConfigError

_RATIO_DENOMINATOR = 1 << 20


class Strategy(str, enum.Enum):
    """How sub-models are chosen each round."""

    MSFUSION = "msfusion"  # double shifting split + adaptive overlap
    FEDROLEX = "fedrolex"  # one rolling window, the same for every device
    HETEROFL = "heterofl"  # fixed prefix windows
    FEDDROPOUT = "feddropout"  # random units per device and round
    FEDAVG = "fedavg"  # the whole model everywhere


class ShiftMode(str, enum.Enum):
    """How the round shift moves windows of groups with different sizes."""

    ALIGNED = "aligned"  # the same fraction of every ring: windows stay one sub-network
    UNITS = "units"  # the same number of units in every group (FedRolex's code)


@dataclass(frozen=True)
class PlanConfig:
    """Planning knobs.

    Attributes:
        strategy: how sub-models are chosen.
        shift_mode: aligned (default) or units, for msfusion.
        round_shift: s as a fraction of the ring per round; None = 1 / min_g K_g.
        participant_shift: spread devices around the ring (phi_i); False = all at 0.
        seed: seed for random plans (feddropout).
        capped_overlap: msfusion only, off by default. When memory caps keep the
            widths below what the overlap target asks for, spend the surplus on
            holders: spread the participant shifts over a span c < 1 of the
            ring (see `holder_span`) that advances by c every round.
    """

    strategy: Strategy = Strategy.MSFUSION
    shift_mode: ShiftMode = ShiftMode.ALIGNED
    round_shift: Fraction | None = None
    participant_shift: bool = True
    seed: int = 0
    capped_overlap: bool = False

    def __post_init__(self) -> None:
        if self.round_shift is not None and not 0 <= self.round_shift < 1:
            raise ConfigError(f"round_shift must be in [0, 1), got {self.round_shift}")


@dataclass(frozen=True)
class DeviceSlot:
    """What planning needs to know of one device.

    Attributes:
        device_id: the device's id.
        max_ratio: the largest share of every group's units it can afford, in (0, 1].
    """

    device_id: str
    max_ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"{self.device_id}: max_ratio must be in (0, 1], got {self.max_ratio}")


@dataclass(frozen=True)
class GroupWindow:
    """The units of one group a device holds this round (sorted unit indices)."""

    group: str
    start: int
    units: tuple[int, ...]

    @property
    def width(self) -> int:
        """Number of units held."""
        return len(self.units)


@dataclass(frozen=True)
class SplitPlan:
    """One round's plan: per device, per group, the window it trains."""

    round_idx: int
    overlap: float
    windows: Mapping[str, Mapping[str, GroupWindow]] = field(default_factory=dict)

    def units(self, device_id: str) -> dict[str, IndexArray]:
        """Unit indices per group for `device_id`, as int64 arrays."""
        return {g: np.asarray(w.units, dtype=np.int64) for g, w in self.windows[device_id].items()}

    def widths(self, device_id: str) -> dict[str, int]:
        """Units per group for `device_id`."""
        return {g: w.width for g, w in self.windows[device_id].items()}


def exact_ratio(value: float) -> Fraction:
    """A float ratio as an exact fraction (denominator at most 2**20)."""
    return Fraction(value).limit_denominator(_RATIO_DENOMINATOR)


def ceil_units(ratio: Fraction, size: int) -> int:
    """ceil(ratio * size) in exact arithmetic, at least 1 and at most size."""
    return max(1, min(size, math.ceil(ratio * size)))


def overlap_ratio_for(ratio: float, n_devices: int) -> float:
    """Overlap between neighbouring windows of equal width: max(0, 1 - 1/(r N))."""
    return max(0.0, 1.0 - 1.0 / (ratio * n_devices))


def effective_ratios(devices: Sequence[DeviceSlot], overlap: float, strategy: Strategy) -> list[Fraction]:
    """Each device's width ratio this round.

    msfusion derives the width from the overlap target, capped by what the
    device affords: r_i = min(r_i^max, 1 / (N (1 - o))). The other split
    strategies use r_i^max; fedavg uses 1.
    """
    if strategy is Strategy.FEDAVG:
        return [Fraction(1)] * len(devices)
    caps = [exact_ratio(d.max_ratio) for d in devices]
    if strategy is not Strategy.MSFUSION or overlap >= 1.0:
        return caps
    target = Fraction(1) / (len(devices) * (1 - exact_ratio(overlap)))
    return [min(cap, target) for cap in caps]


def holder_span(ratios: Sequence[Fraction], overlap: float) -> Fraction:
    """The share c of the ring the participant shifts spread over (`capped_overlap`).

    The capped widths give a natural overlap o_nat = max(0, 1 - 1/sum_i r_i).
    A target o at or below it needs nothing more: c = 1, the whole ring. Above
    it, c = clamp(sum_i r_i (1 - o), min_i r_i, 1): each unit of the span is then
    held by about sum_i r_i / c devices, and the round covers about c plus one
    window of every group.
    """
    total = sum(ratios, Fraction(0))
    target = exact_ratio(overlap)
    natural = max(Fraction(0), 1 - 1 / total)
    if target <= natural:
        return Fraction(1)
    return min(Fraction(1), max(min(ratios), total * (1 - target)))


def _window(group: str, size: int, start: int, width: int) -> GroupWindow:
    units = tuple(sorted((start + j) % size for j in range(width)))
    return GroupWindow(group=group, start=start, units=units)


def plan_round(
    spec: ModelSpec,
    devices: Sequence[DeviceSlot],
    round_idx: int,
    overlap: float,
    config: PlanConfig,
) -> SplitPlan:
    """Plan one round: the window of every width group each device trains.

    Args:
        spec: the model's width groups.
        devices: participating devices, in a stable order (the ring order).
        round_idx: round number t >= 0.
        overlap: this round's overlap target o_t in [0, 1] (msfusion only).
        config: strategy and shift knobs.

    Returns:
        An immutable SplitPlan.

    Raises:
        ConfigError: no devices, duplicate ids, or a bad overlap.
    """
    if not devices:
        raise ConfigError("cannot plan a round for zero devices")
    ids = [d.device_id for d in devices]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate device ids in {ids}")
    if not 0.0 <= overlap <= 1.0:
        raise ConfigError(f"overlap must be in [0, 1], got {overlap}")
    if round_idx < 0:
        raise ConfigError(f"round_idx must be >= 0, got {round_idx}")

    ratios = effective_ratios(devices, overlap, config.strategy)
    total = sum(ratios, Fraction(0))
    min_size = min(g.size for g in spec.groups)
    shift = Fraction(1, min_size) if config.round_shift is None else config.round_shift
    # Holder span c (1 unless capped_overlap applies) and where it starts this round.
    span = Fraction(1)
    if config.capped_overlap and config.strategy is Strategy.MSFUSION and config.participant_shift:
        span = holder_span(ratios, overlap)
    span_offset = (round_idx * span) % 1
    windows: dict[str, Mapping[str, GroupWindow]] = {}
    cumulative = Fraction(0)
    for index, (device, ratio) in enumerate(zip(devices, ratios)):
        # Participant shift: the cumulative share of the ring (i / N for equal widths).
        phi_i = cumulative / total if config.participant_shift else Fraction(0)
        if span != 1:
            # Capped overlap: squeeze the shifts into the span, which advances by c a round.
            phi_i = (span_offset + span * phi_i) % 1
        cumulative += ratio
        per_group: dict[str, GroupWindow] = {}
        for group in spec.groups:
            size = group.size
            width = ceil_units(ratio, size)
            if config.strategy is Strategy.FEDAVG or width == size:
                per_group[group.name] = _window(group.name, size, 0, size)
            elif config.strategy is Strategy.HETEROFL:
                per_group[group.name] = _window(group.name, size, 0, width)
            elif config.strategy is Strategy.FEDROLEX:
                per_group[group.name] = _window(group.name, size, round_idx % size, width)
            elif config.strategy is Strategy.FEDDROPOUT:
                rng = np.random.default_rng([config.seed, round_idx, index, size])
                chosen = rng.choice(size, size=width, replace=False)
                units = tuple(int(u) for u in np.sort(chosen))
                per_group[group.name] = GroupWindow(group.name, units[0], units)
            elif config.shift_mode is ShiftMode.ALIGNED:
                phi = (phi_i + round_idx * shift) % 1
                start = math.floor(phi * size)
                per_group[group.name] = _window(group.name, size, start, width)
            else:
                # Units mode: the same number of units per round in every group.
                units_per_round = math.floor(shift * min_size) if shift else 0
                start = (math.floor(phi_i * size) + round_idx * units_per_round) % size
                per_group[group.name] = _window(group.name, size, start, width)
        windows[device.device_id] = MappingProxyType(per_group)
    return SplitPlan(round_idx=round_idx, overlap=overlap, windows=MappingProxyType(windows))


def coverage(spec: ModelSpec, plan: SplitPlan) -> dict[str, IndexArray]:
    """How many devices hold each unit of every group this round."""
    counts = {g.name: np.zeros(g.size, dtype=np.int64) for g in spec.groups}
    for per_group in plan.windows.values():
        for name, window in per_group.items():
            counts[name][list(window.units)] += 1
    return counts
