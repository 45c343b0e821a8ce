"""The building blocks every architecture shares: the scaled layers, the norms, `SplitModel`, spec helpers.

A sub-model holding k of a group's K units multiplies the input of every layer
that sums over that group by K/k (the scaler); at full width the factor is
exactly 1 and no multiply is emitted.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msfusion.algorithm.spec import ModelSpec, TensorAxis
from msfusion.models.config import ModelConfig


class ScaledConv2d(nn.Conv2d):
    """A Conv2d whose input is multiplied by `in_scale` (K/k of its input's group)."""

    def __init__(self, *args: object, in_scale: float = 1.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.in_scale = float(in_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.in_scale != 1.0:
            x = x * self.in_scale
        return super().forward(x)


class ScaledLinear(nn.Linear):
    """A Linear whose input is multiplied by `in_scale` (K/k of its input's group)."""

    def __init__(self, in_features: int, out_features: int, in_scale: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        self.in_scale = float(in_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.in_scale != 1.0:
            x = x * self.in_scale
        return super().forward(x)


_traceable = False  # set by `traceable_norms` while an exporter traces a module


@contextlib.contextmanager
def traceable_norms() -> Iterator[None]:
    """Within: the norms below run as elementwise ops and means, the form every exporter can differentiate.

    Outside, torch eager runs its native fused kernels (the same function
    within float rounding, ~2.5x faster on the CNN's evaluation).
    """
    global _traceable
    saved, _traceable = _traceable, True
    try:
        yield
    finally:
        _traceable = saved


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm; traced as elementwise ops and means (`traceable_norms`).

    ONNX exports F.group_norm as InstanceNormalization, for which
    onnxruntime-training 1.19 registers no gradient, and ExecuTorch's portable
    kernels have no group-norm backward; the elementwise form exports as
    ReduceMean/Sub/Mul/Div/Sqrt, which train everywhere. Same parameters,
    same outputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not _traceable:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        batch = x.shape[0]
        grouped = x.reshape(batch, self.num_groups, -1)  # (B, C, H, W) -> (B, G, C/G*H*W)
        mean = grouped.mean(dim=-1, keepdim=True)
        centered = grouped - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        normed = (centered / torch.sqrt(var + self.eps)).reshape(x.shape)
        affine_shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        return normed * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (over the last axis); traced as elementwise ops and means (`traceable_norms`).

    ONNX opset 17 exports F.layer_norm as one LayerNormalization node without
    its mean/inv-std outputs, which onnxruntime-training's gradient needs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not _traceable:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        return centered / torch.sqrt(var + self.eps) * self.weight + self.bias


class SplitModel(nn.Module):
    """A model built at some widths; `forward(x) -> (logits, z)`.

    Attributes:
        config: the architecture.
        widths: units held per width group (every group named).
        spec: the architecture's full-width spec.
    """

    def __init__(self, config: ModelConfig, widths: Mapping[str, int], spec: ModelSpec) -> None:
        super().__init__()
        self.config = config
        self.widths = dict(widths)
        self.spec = spec

    def input_scales(self) -> dict[str, float]:
        """The scaler of every layer that sums over a split axis, by module name."""
        return {
            name: module.in_scale
            for name, module in self.named_modules()
            if isinstance(module, (ScaledConv2d, ScaledLinear))
        }

    def gradient_scales(self) -> dict[str, float]:
        """Scaler compensation: the factor SGD applies to each parameter's gradient.

        A sub-model holding k of a group's K units computes exactly what the
        full model computes when every unit is repeated K/k times (the scaler
        makes up for the repeats; test_models checks the identity). A
        sub-model parameter split along groups g1, g2, ... therefore stands
        for prod(K/k) identical parameters of that tiled full model, and its
        gradient is the sum of theirs. Multiplying it by prod(k/K) makes one
        SGD step of the sub-model exactly one SGD step of the tiled full model,
        at the full model's learning rate; without it, plain SGD trains the
        split layers up to (K/k)^2 times faster than the full model, which at
        small widths diverges or oscillates (docs/algorithm.md,
        "Scaler-compensated SGD"). Unsplit parameters keep factor 1 (omitted).
        """
        spec = self.spec
        factors: dict[str, float] = {}
        for group in spec.groups:
            ratio = self.widths[group.name] / group.size
            if ratio == 1.0:
                continue
            for axis in group.axes:
                factors[axis.tensor] = factors.get(axis.tensor, 1.0) * ratio
        return factors


def scaled_parameters(model: nn.Module, scales: Mapping[str, float]) -> list[tuple[nn.Parameter, float]]:
    """The (parameter, factor) pairs of `scales` (by name), resolved once per run for `scale_gradients`."""
    params = dict(model.named_parameters())
    return [(params[name], factor) for name, factor in scales.items()]


def scale_gradients(pairs: Sequence[tuple[nn.Parameter, float]]) -> None:
    """Multiply each parameter's gradient by its factor (after backward, before the step)."""
    for param, factor in pairs:
        if param.grad is not None:
            param.grad.mul_(factor)


def axes_of(*pairs: tuple[str, int], unit_size: int = 1) -> list[TensorAxis]:
    return [TensorAxis(tensor, axis, unit_size) for tensor, axis in pairs]


def norm_axes(prefix: str) -> list[TensorAxis]:
    return axes_of((f"{prefix}.weight", 0), (f"{prefix}.bias", 0))


def scaled_copy(elements: int, k: int, full: int) -> int:
    """Activation count: the scaler's multiply (K/k != 1) gives a layer a private copy of its input to keep."""
    return elements if k != full else 0
