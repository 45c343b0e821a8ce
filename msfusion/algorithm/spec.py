"""Width groups: the splittable hidden units a model declares (torch-free).

A model declares its width groups explicitly (msfusion.md, section 1): a group
is a ring of K units together with every (tensor, axis) those units index.
Nothing here matches substrings of parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from msfusion.algorithm.indexing import IndexArray, expand_units
from msfusion.errors import ConfigError


@dataclass(frozen=True)
class TensorAxis:
    """One axis of one named tensor indexed by a group's units.

    Attributes:
        tensor: exact name of the tensor in the model's state dict.
        axis: the axis the group's units index.
        unit_size: elements per unit along that axis (head_dim for attention
            heads, 1 for channels and hidden units).
    """

    tensor: str
    axis: int
    unit_size: int = 1


@dataclass(frozen=True)
class WidthGroup:
    """A ring of `size` hidden units and every tensor axis they index."""

    name: str
    size: int
    axes: tuple[TensorAxis, ...]

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"group {self.name!r}: size must be >= 1, got {self.size}")
        if not self.axes:
            raise ConfigError(f"group {self.name!r} indexes no tensor")


@dataclass(frozen=True)
class ModelSpec:
    """The splittable structure of one architecture at full width.

    Attributes:
        arch: architecture name (as the model registry knows it).
        shapes: full shape of every tensor of the model, by exact name.
        groups: the width groups; a tensor axis belongs to at most one group.
    """

    arch: str
    shapes: Mapping[str, tuple[int, ...]]
    groups: tuple[WidthGroup, ...]
    _axis_owner: Mapping[tuple[str, int], tuple[str, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner: dict[tuple[str, int], tuple[str, int]] = {}
        names = set()
        for group in self.groups:
            if group.name in names:
                raise ConfigError(f"duplicate width group {group.name!r}")
            names.add(group.name)
            for ax in group.axes:
                if ax.tensor not in self.shapes:
                    raise ConfigError(f"group {group.name!r} names unknown tensor {ax.tensor!r}")
                shape = self.shapes[ax.tensor]
                if not 0 <= ax.axis < len(shape):
                    raise ConfigError(f"{ax.tensor}: axis {ax.axis} out of range for shape {shape}")
                if shape[ax.axis] != group.size * ax.unit_size:
                    raise ConfigError(
                        f"{ax.tensor} axis {ax.axis} has {shape[ax.axis]} elements, "
                        f"group {group.name!r} needs {group.size} x {ax.unit_size}"
                    )
                key = (ax.tensor, ax.axis)
                if key in owner:
                    raise ConfigError(f"{ax.tensor} axis {ax.axis} is in two groups")
                owner[key] = (group.name, ax.unit_size)
        object.__setattr__(self, "_axis_owner", owner)

    @property
    def group_sizes(self) -> dict[str, int]:
        """Full size K_g of every group."""
        return {g.name: g.size for g in self.groups}

    def group(self, name: str) -> WidthGroup:
        """The group called `name`."""
        for g in self.groups:
            if g.name == name:
                return g
        raise ConfigError(f"unknown width group {name!r}")

    def sliced_axes(self, tensor: str) -> dict[int, tuple[str, int]]:
        """Map axis -> (group, unit_size) for the grouped axes of `tensor`."""
        return {axis: owner for (name, axis), owner in self._axis_owner.items() if name == tensor}

    def sub_shape(self, tensor: str, widths: Mapping[str, int]) -> tuple[int, ...]:
        """Shape of `tensor` in a sub-model holding `widths[g]` units of each group."""
        shape = list(self.shapes[tensor])
        for axis, (group, unit_size) in self.sliced_axes(tensor).items():
            shape[axis] = widths[group] * unit_size
        return tuple(shape)

    def param_count(self, widths: Mapping[str, int] | None = None) -> int:
        """Number of parameters of the sub-model at `widths` (full model if None)."""
        widths = self.group_sizes if widths is None else widths
        return sum(int(np.prod(self.sub_shape(t, widths))) for t in self.shapes)

    def tensor_index(self, tensor: str, units: Mapping[str, IndexArray]) -> dict[int, IndexArray]:
        """Element indices along each grouped axis of `tensor` for the given unit sets.

        Args:
            tensor: tensor name.
            units: unit indices held, per group (in the sub-model's order).

        Returns:
            axis -> element indices into the full tensor along that axis.
        """
        out: dict[int, IndexArray] = {}
        for axis, (group, unit_size) in self.sliced_axes(tensor).items():
            u = np.asarray(units[group], dtype=np.int64)
            out[axis] = expand_units(u, unit_size)
        return out


def widths_for_ratio(spec: ModelSpec, ratio: float) -> dict[str, int]:
    """Units per group when every group keeps `ratio` of its units (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"width ratio must be in (0, 1], got {ratio}")
    return {g.name: max(1, min(g.size, int(np.ceil(ratio * g.size - 1e-9)))) for g in spec.groups}


def ratio_for_budget(spec: ModelSpec, budget: float) -> float:
    """Largest uniform width ratio whose sub-model has at most `budget` x full parameters.

    Args:
        spec: model spec.
        budget: parameter budget as a share of the full model, in (0, 1].

    Returns:
        The ratio r (a multiple of 1/1024) with param_count(widths_for_ratio(r))
        <= budget * param_count().
    """
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"parameter budget must be in (0, 1], got {budget}")
    full = spec.param_count()
    lo, hi = 1, 1024
    if spec.param_count(widths_for_ratio(spec, lo / 1024)) > budget * full:
        raise ConfigError(f"even the narrowest sub-model exceeds a budget of {budget}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spec.param_count(widths_for_ratio(spec, mid / 1024)) <= budget * full + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo / 1024
