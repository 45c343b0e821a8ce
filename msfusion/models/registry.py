"""The registry of architectures: one place that finds an architecture's file by `ModelConfig.arch`.

Every architecture is one file (`cnn.py`, `resnet.py`, `charlm.py`) exposing
`spec` (its tensors and width groups by exact `state_dict` name, msfusion.md
section 1), `Module` (the model at any widths), `flops` (forward MACs per
sample), `shrunk` (the standalone small model of fedavg-small) and
`activations` (the elements one sample keeps for the backward pass, counted
tensor by tensor as autograd keeps them, int64 tensors twice: the unit is a
float32 element; the memory model's sizing reads them). The functions here
are the public API over them (build, spec, FLOPs, activation counts, numpy
I/O); the tests check that each spec and module agree.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from msfusion.algorithm.spec import ModelSpec, widths_for_ratio
from msfusion.errors import ConfigError
from msfusion.models import charlm, cnn, resnet
from msfusion.models.config import ModelConfig
from msfusion.models.layers import SplitModel

Widths = Mapping[str, int]

_REGISTRY: dict[str, ModuleType] = {"cnn": cnn, "resnet": resnet, "charlm": charlm}


def shrunk_config(cfg: ModelConfig, ratio: float) -> ModelConfig:
    """A whole, standalone model of the same architecture at `ratio` of every group's width.

    This is what a user would train instead of splitting ("fedavg-small"): a
    full model of the size one device affords, with no scaler.
    """
    return _REGISTRY[cfg.arch].shrunk(cfg, widths_for_ratio(model_spec(cfg), ratio))


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """The full-width tensors and width groups of `cfg`'s architecture.

    Args:
        cfg: model configuration.

    Returns:
        The spec; its tensor names are exactly the model's `state_dict` keys.
    """
    return _REGISTRY[cfg.arch].spec(cfg)


def resolve_widths(spec: ModelSpec, widths: Widths | None) -> dict[str, int]:
    """Units per group, with every group named (a missing group is at full width).

    Args:
        spec: the model's spec.
        widths: units per group, or None for the full model.

    Returns:
        group -> units held, for every group of `spec`.

    Raises:
        ConfigError: an unknown group, or a width outside [1, K].
    """
    full: dict[str, int] = spec.group_sizes
    if widths is None:
        return full
    unknown = sorted(set(widths) - set(full))
    if unknown:
        raise ConfigError(f"unknown width groups {unknown}; {spec.arch} has {sorted(full)}")
    resolved = dict(full)
    for group, k in widths.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= full[group]:
            raise ConfigError(f"width of group {group!r} must be an integer in [1, {full[group]}], got {k!r}")
        resolved[group] = int(k)
    return resolved


def build_model(cfg: ModelConfig, widths: Widths | None = None, seed: int | None = None) -> SplitModel:
    """Build the model at `widths` units per group, with the scaler built in.

    Args:
        cfg: model configuration.
        widths: units held per group (None or a missing group: full width).
        seed: seeds the initialization (the global torch RNG is left untouched);
            None draws from the global torch RNG.

    Returns:
        The module; its `state_dict()` keys are `model_spec(cfg).shapes` keys
        with shapes `spec.sub_shape(name, widths)`.

    Raises:
        ConfigError: invalid widths.
    """
    spec = model_spec(cfg)
    resolved = resolve_widths(spec, widths)
    scales = {g: spec.group(g).size / k for g, k in resolved.items()}
    arch = _REGISTRY[cfg.arch]
    if seed is None:
        return arch.Module(cfg, resolved, scales)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return arch.Module(cfg, resolved, scales)


def flops_per_sample(cfg: ModelConfig, widths: Widths | None = None) -> int:
    """Forward multiply-accumulates per sample of the sub-model at `widths`.

    Counts convolutions, linear layers and the attention matmuls; norms,
    activations, pooling and embedding lookups are not counted. A char-LM
    sample is one window of `cfg.context` characters.

    Args:
        cfg: model configuration.
        widths: units held per group (None: full model).

    Returns:
        The multiply-accumulate count.
    """
    return _REGISTRY[cfg.arch].flops(cfg, resolve_widths(model_spec(cfg), widths))


def input_scales(cfg: ModelConfig, widths: Widths | None) -> dict[str, float]:
    """The scaler K/k of every scaled layer's weight at `widths`, by weight name (all of them, 1.0 at full width)."""
    key = tuple(sorted(resolve_widths(model_spec(cfg), widths).items()))
    return dict(_input_scales(cfg, key))


@functools.lru_cache(maxsize=256)
def _input_scales(cfg: ModelConfig, widths: tuple[tuple[str, int], ...]) -> tuple[tuple[str, float], ...]:
    model = build_model(cfg, dict(widths))
    return tuple((f"{name}.weight", scale) for name, scale in model.input_scales().items())


def activation_elements(cfg: ModelConfig, widths: Widths | None = None) -> int:
    """Activation elements one sample of the sub-model at `widths` keeps for the backward pass."""
    return int(_REGISTRY[cfg.arch].activations(cfg, resolve_widths(model_spec(cfg), widths)))


def state_to_numpy(module: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Detached float32 copies of every tensor of `module.state_dict()`."""
    return {
        name: tensor.detach().cpu().to(torch.float32).numpy().copy() for name, tensor in module.state_dict().items()
    }


def load_numpy(module: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load numpy weights into `module`, strictly.

    Args:
        module: the model.
        weights: tensor name -> array; names and shapes must match the model's.

    Raises:
        ConfigError: a missing, unexpected or mis-shaped tensor (named).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ConfigError(f"weights lack tensor {missing[0]!r} ({len(missing)} missing)")
    unexpected = sorted(set(weights) - set(own))
    if unexpected:
        raise ConfigError(f"weights hold unknown tensor {unexpected[0]!r} ({len(unexpected)} unknown)")
    tensors = {}
    for name, target in own.items():
        array = np.asarray(weights[name])
        if tuple(array.shape) != tuple(target.shape):
            raise ConfigError(f"tensor {name!r} has shape {array.shape}, the model needs {tuple(target.shape)}")
        tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32))
    module.load_state_dict(tensors, strict=True)
