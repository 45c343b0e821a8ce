"""The plain CNN: conv blocks (conv, GroupNorm, ReLU, max pool), pooled features, a linear head.

The architecture's file (see `registry.py`): `spec`, `Module`, `flops`, `shrunk`, `activations`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from msfusion.algorithm.spec import ModelSpec, WidthGroup
from msfusion.models.config import ModelConfig
from msfusion.models.layers import (
    GroupNorm,
    ScaledConv2d,
    ScaledLinear,
    SplitModel,
    axes_of,
    norm_axes,
)

Widths = Mapping[str, int]
_NORM_SAVED = 2  # our GroupNorm/LayerNorm keep the centered and the normalized tensor


def spec(cfg: ModelConfig) -> ModelSpec:
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = cfg.in_channels
    for i, c in enumerate(cfg.channels):
        shapes[f"blocks.{i}.conv.weight"] = (c, c_in, 3, 3)
        shapes[f"blocks.{i}.conv.bias"] = (c,)
        shapes[f"blocks.{i}.norm.weight"] = (c,)
        shapes[f"blocks.{i}.norm.bias"] = (c,)
        c_in = c
    shapes["classifier.weight"] = (cfg.num_classes, c_in)
    shapes["classifier.bias"] = (cfg.num_classes,)

    groups = []
    for i, c in enumerate(cfg.channels):
        is_last = i == len(cfg.channels) - 1
        consumer = "classifier.weight" if is_last else f"blocks.{i + 1}.conv.weight"
        axes = axes_of((f"blocks.{i}.conv.weight", 0), (f"blocks.{i}.conv.bias", 0))
        axes += norm_axes(f"blocks.{i}.norm") + axes_of((consumer, 1))
        groups.append(WidthGroup(f"conv{i}", c, tuple(axes)))
    return ModelSpec("cnn", shapes, tuple(groups))


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, in_scale: float) -> None:
        super().__init__()
        self.conv = ScaledConv2d(c_in, c_out, 3, padding=1, in_scale=in_scale)
        self.norm = GroupNorm(1, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)  # (B, c, H, W) -> (B, c, H/2, W/2)


class Module(SplitModel):
    def __init__(self, cfg: ModelConfig, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__(cfg, widths, spec(cfg))
        blocks = []
        c_in, scale = cfg.in_channels, 1.0
        for i in range(len(cfg.channels)):
            blocks.append(_ConvBlock(c_in, widths[f"conv{i}"], scale))
            c_in, scale = widths[f"conv{i}"], scales[f"conv{i}"]
        self.blocks = nn.ModuleList(blocks)
        self.classifier = ScaledLinear(c_in, cfg.num_classes, in_scale=scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        z = x.mean(dim=(2, 3))  # (B, c, h, w) -> (B, c)
        return self.classifier(z), z


def flops(cfg: ModelConfig, widths: Widths) -> int:
    total, side, c_in = 0, cfg.image_size, cfg.in_channels
    for i in range(len(cfg.channels)):
        c_out = widths[f"conv{i}"]
        total += side * side * c_out * c_in * 9
        side, c_in = side // 2, c_out
    return total + c_in * cfg.num_classes


def shrunk(cfg: ModelConfig, widths: Widths) -> ModelConfig:
    return replace(cfg, channels=tuple(widths[f"conv{i}"] for i in range(len(cfg.channels))))


def activations(cfg: ModelConfig, widths: Widths) -> int:
    """Activation elements one sample of the CNN keeps for the backward pass, at `widths`."""
    side, c_in, total = cfg.image_size, cfg.in_channels, 0
    for i in range(len(cfg.channels)):
        c = widths[f"conv{i}"]
        total += c_in * side * side  # the conv's input (the pool's output, or its scaled copy)
        total += (_NORM_SAVED + 1) * c * side * side  # norm, relu output: (c, s, s)
        side //= 2
        total += 2 * c * side * side  # max pool indices: int64 (c, s/2, s/2), counted in float32 units
        c_in = c
    return int(total + c_in + cfg.num_classes)  # the classifier's input z, the log-softmax
