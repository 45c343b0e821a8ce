"""The ResNet-style network: GroupNorm basic blocks in stages; residual adds share a stage's width group.

The architecture's file (see `registry.py`): `spec`, `Module`, `flops`, `shrunk`, `activations`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from msfusion.algorithm.spec import ModelSpec, TensorAxis, WidthGroup
from msfusion.models.config import ModelConfig
from msfusion.models.layers import (
    GroupNorm,
    ScaledConv2d,
    ScaledLinear,
    SplitModel,
    axes_of,
    norm_axes,
    scaled_copy,
)

Widths = Mapping[str, int]
_NORM_SAVED = 2  # our GroupNorm/LayerNorm keep the centered and the normalized tensor


def _resnet_layout(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(stage, block, stride) of every residual block, in order."""
    return [(s, b, 2 if s > 0 and b == 0 else 1) for s in range(len(cfg.channels)) for b in range(cfg.blocks_per_stage)]


def _has_shortcut_conv(stage: int, block: int) -> bool:
    # The stem outputs channels[0], so only the first block of stages >= 1
    # (stride 2, new width) needs a projection shortcut.
    return stage > 0 and block == 0


def spec(cfg: ModelConfig) -> ModelSpec:
    ch = cfg.channels
    shapes: dict[str, tuple[int, ...]] = {
        "stem.conv.weight": (ch[0], cfg.in_channels, 3, 3),
        "stem.norm.weight": (ch[0],),
        "stem.norm.bias": (ch[0],),
    }
    stream: dict[int, list[TensorAxis]] = {0: axes_of(("stem.conv.weight", 0)) + norm_axes("stem.norm")}
    mids = []
    for s, b, _ in _resnet_layout(cfg):
        p = f"stages.{s}.{b}"
        c_in = ch[s - 1] if b == 0 and s > 0 else ch[s]
        in_stream = s - 1 if b == 0 and s > 0 else s
        shapes[f"{p}.conv1.weight"] = (ch[s], c_in, 3, 3)
        shapes[f"{p}.norm1.weight"] = shapes[f"{p}.norm1.bias"] = (ch[s],)
        shapes[f"{p}.conv2.weight"] = (ch[s], ch[s], 3, 3)
        shapes[f"{p}.norm2.weight"] = shapes[f"{p}.norm2.bias"] = (ch[s],)
        mid = axes_of((f"{p}.conv1.weight", 0)) + norm_axes(f"{p}.norm1") + axes_of((f"{p}.conv2.weight", 1))
        mids.append(WidthGroup(f"stage{s}.block{b}", ch[s], tuple(mid)))
        stream[in_stream] += axes_of((f"{p}.conv1.weight", 1))
        stream.setdefault(s, [])
        stream[s] += axes_of((f"{p}.conv2.weight", 0)) + norm_axes(f"{p}.norm2")
        if _has_shortcut_conv(s, b):
            shapes[f"{p}.shortcut.conv.weight"] = (ch[s], c_in, 1, 1)
            shapes[f"{p}.shortcut.norm.weight"] = shapes[f"{p}.shortcut.norm.bias"] = (ch[s],)
            stream[in_stream] += axes_of((f"{p}.shortcut.conv.weight", 1))
            stream[s] += axes_of((f"{p}.shortcut.conv.weight", 0)) + norm_axes(f"{p}.shortcut.norm")
    shapes["classifier.weight"] = (cfg.num_classes, ch[-1])
    shapes["classifier.bias"] = (cfg.num_classes,)
    stream[len(ch) - 1] += axes_of(("classifier.weight", 1))
    groups = [WidthGroup(f"stage{s}", ch[s], tuple(stream[s])) for s in range(len(ch))]
    return ModelSpec("resnet", shapes, tuple(groups + mids))


class _NormedConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, in_scale: float) -> None:
        super().__init__()
        self.conv = ScaledConv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False, in_scale=in_scale)
        self.norm = GroupNorm(1, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.conv(x))
        return out


class _BasicBlock(nn.Module):
    def __init__(
        self,
        c_in: int,
        mid: int,
        c_out: int,
        stride: int,
        in_scale: float,
        mid_scale: float,
        projection: bool,
    ) -> None:
        super().__init__()
        self.conv1 = ScaledConv2d(c_in, mid, 3, stride=stride, padding=1, bias=False, in_scale=in_scale)
        self.norm1 = GroupNorm(1, mid)
        self.conv2 = ScaledConv2d(mid, c_out, 3, padding=1, bias=False, in_scale=mid_scale)
        self.norm2 = GroupNorm(1, c_out)
        self.shortcut = _NormedConv(c_in, c_out, 1, stride, in_scale) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class Module(SplitModel):
    def __init__(self, cfg: ModelConfig, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__(cfg, widths, spec(cfg))
        self.stem = _NormedConv(cfg.in_channels, widths["stage0"], 3, 1, 1.0)
        stages: list[list[nn.Module]] = [[] for _ in cfg.channels]
        for s, b, stride in _resnet_layout(cfg):
            in_group = f"stage{s - 1}" if b == 0 and s > 0 else f"stage{s}"
            mid = f"stage{s}.block{b}"
            stages[s].append(
                _BasicBlock(
                    widths[in_group],
                    widths[mid],
                    widths[f"stage{s}"],
                    stride,
                    scales[in_group],
                    scales[mid],
                    _has_shortcut_conv(s, b),
                )
            )
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        last = f"stage{len(cfg.channels) - 1}"
        self.classifier = ScaledLinear(widths[last], cfg.num_classes, in_scale=scales[last])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        z = x.mean(dim=(2, 3))  # (B, c, h, w) -> (B, c)
        return self.classifier(z), z


def flops(cfg: ModelConfig, widths: Widths) -> int:
    side = cfg.image_size
    total = side * side * widths["stage0"] * cfg.in_channels * 9
    for s, b, stride in _resnet_layout(cfg):
        c_in = widths[f"stage{s - 1}" if b == 0 and s > 0 else f"stage{s}"]
        mid, c_out = widths[f"stage{s}.block{b}"], widths[f"stage{s}"]
        side = (side - 1) // stride + 1  # 3x3 pad 1 and 1x1 pad 0 give the same size
        total += side * side * (mid * c_in * 9 + c_out * mid * 9)
        if _has_shortcut_conv(s, b):
            total += side * side * c_out * c_in
    return total + widths[f"stage{len(cfg.channels) - 1}"] * cfg.num_classes


def shrunk(cfg: ModelConfig, widths: Widths) -> ModelConfig:
    return replace(cfg, channels=tuple(widths[f"stage{i}"] for i in range(len(cfg.channels))))


def activations(cfg: ModelConfig, widths: Widths) -> int:
    """Activation elements one sample of the ResNet keeps for the backward pass, at `widths`."""
    ch, side = cfg.channels, cfg.image_size
    stem = widths["stage0"]
    total = cfg.in_channels * side * side + (_NORM_SAVED + 1) * stem * side * side  # image, norm, relu
    for s in range(len(ch)):
        for b in range(cfg.blocks_per_stage):
            first = b == 0 and s > 0
            c_in = widths[f"stage{s - 1}" if first else f"stage{s}"]
            c_in_full = ch[s - 1] if first else ch[s]
            mid, c_out = widths[f"stage{s}.block{b}"], widths[f"stage{s}"]
            # conv1 (and the projection shortcut) keep x itself, already kept by the
            # previous relu, unless the scaler gives each its own copy.
            copies = 2 if first else 1
            total += copies * scaled_copy(c_in * side * side, c_in, c_in_full)
            if first:
                side = (side - 1) // 2 + 1
            total += (_NORM_SAVED + 1) * mid * side * side  # norm1, relu1 (conv2's input)
            total += scaled_copy(mid * side * side, mid, ch[s])
            total += (_NORM_SAVED + 1) * c_out * side * side  # norm2, the final relu
            if first:
                total += _NORM_SAVED * c_out * side * side  # the shortcut's norm
    last = widths[f"stage{len(ch) - 1}"]
    return int(total + last + cfg.num_classes)
