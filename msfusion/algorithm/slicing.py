"""Slicing the global model into a device's sub-model weights (numpy, torch-free)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.indexing import TensorIndex, take
from msfusion.algorithm.spec import IndexArray, ModelSpec
from msfusion.errors import ConfigError

Weights = dict[str, npt.NDArray[np.float32]]


def tensor_indices(spec: ModelSpec, units: Mapping[str, IndexArray]) -> dict[str, TensorIndex]:
    """Per tensor, axis -> full-tensor element indices for the given unit sets."""
    return {name: spec.tensor_index(name, units) for name in spec.shapes}


def slice_weights(
    global_w: Mapping[str, npt.NDArray[np.float32]],
    spec: ModelSpec,
    units: Mapping[str, IndexArray],
) -> Weights:
    """The sub-model weights a device holding `units` trains.

    Args:
        global_w: full-width weights, named as in the spec.
        spec: the model's width groups.
        units: unit indices held per group (sorted).

    Returns:
        Copies of every tensor restricted to the units: (K*u, ...) -> (k*u, ...).

    Raises:
        ConfigError: a tensor is missing or has the wrong shape.
    """
    out: Weights = {}
    for name, shape in spec.shapes.items():
        if name not in global_w:
            raise ConfigError(f"global weights lack tensor {name!r}")
        full = global_w[name]
        if tuple(full.shape) != tuple(shape):
            raise ConfigError(f"{name}: global shape {full.shape} != spec shape {shape}")
        out[name] = take(full, spec.tensor_index(name, units))
    return out
