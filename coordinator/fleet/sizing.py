"""Element counts of sub-models by uniform width ratio: what the memory model fits against.

The memory model (`coordinator/fleet/memory_model.py`) needs, for any width, how many
parameters the sub-model has (weights, gradients and optimizer state scale
with it) and how many activation elements one sample keeps for the backward
pass. Parameters come from the `ModelSpec`; activations from each
architecture's own `activations` (in its file under `msfusion/models/`,
found through the registry; a test checks them against the tensors torch's
autograd saves). The exported backends keep about the same tensors; the
fitted bytes per activation absorbs the difference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.models import registry
from msfusion.models.config import ModelConfig


@dataclass(frozen=True)
class ModelSizes:
    """A model's element counts as functions of the uniform width ratio.

    Attributes:
        param_count: ratio -> parameters of the sub-model.
        activation_elements: ratio -> activation elements of one sample.
    """

    param_count: Callable[[float], int]
    activation_elements: Callable[[float], int]


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    """Parameter and activation counts of a `ModelConfig`'s sub-models by width ratio."""
    spec = registry.model_spec(cfg)

    # Cached: sizing a device evaluates every ratio k/1024, for every budget asked.
    @functools.lru_cache(maxsize=4096)
    def param_count(ratio: float) -> int:
        return int(spec.param_count(widths_for_ratio(spec, ratio)))

    @functools.lru_cache(maxsize=4096)
    def activation_elements(ratio: float) -> int:
        return registry.activation_elements(cfg, widths_for_ratio(spec, ratio))

    return ModelSizes(param_count=param_count, activation_elements=activation_elements)
