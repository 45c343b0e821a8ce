"""Shared fixtures for the algorithm tests: a tiny hand-written spec."""

from __future__ import annotations

import numpy as np
import pytest

from msfusion.algorithm.spec import ModelSpec, TensorAxis, WidthGroup


@pytest.fixture()
def tiny_spec() -> ModelSpec:
    """Two linear layers: in 3 -> hidden a (8 units) -> hidden b (4 units of 2) -> out 2."""
    shapes = {
        "l1.weight": (8, 3),
        "l1.bias": (8,),
        "l2.weight": (8, 8),
        "l2.bias": (8,),
        "head.weight": (2, 8),
        "head.bias": (2,),
    }
    groups = (
        WidthGroup("a", 8, (TensorAxis("l1.weight", 0), TensorAxis("l1.bias", 0), TensorAxis("l2.weight", 1))),
        WidthGroup(
            "b",
            4,
            (TensorAxis("l2.weight", 0, 2), TensorAxis("l2.bias", 0, 2), TensorAxis("head.weight", 1, 2)),
        ),
    )
    return ModelSpec(arch="tiny", shapes=shapes, groups=groups)


@pytest.fixture()
def tiny_weights(tiny_spec: ModelSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in tiny_spec.shapes.items()}
