"""The split-able models (CNN, ResNet, char-LM), their width groups and the scaler.

Every architecture is declared twice, side by side: `_<arch>_spec` lists the
full-width tensors and width groups by exact `state_dict` name (msfusion.md,
section 1), and `_<Arch>` builds the torch module at any widths. The tests
check that the two agree. A sub-model holding k of a group's K units multiplies
the input of every layer that sums over that group by K/k (the scaler); at full
width the factor is exactly 1 and no multiply is emitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from msfusion.algorithm.spec import ModelSpec, TensorAxis, WidthGroup, widths_for_ratio
from msfusion.errors import ConfigError

ARCHS = ("cnn", "resnet", "charlm")
Widths = Mapping[str, int]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and dimensions of the global model.

    Attributes:
        arch: "cnn", "resnet" or "charlm".
        in_channels: image channels (image models).
        image_size: image height = width (image models).
        num_classes: classes (image models).
        channels: CNN conv widths, or ResNet stage widths.
        blocks_per_stage: residual blocks per ResNet stage.
        vocab_size: characters in the vocabulary (char-LM).
        d_model: residual stream width (char-LM).
        n_heads: attention heads per layer (char-LM).
        head_dim: dims per head; never split (char-LM).
        d_ff: FFN hidden units (char-LM).
        n_layers: transformer layers (char-LM).
        context: longest sequence, in characters (char-LM).
    """

    arch: str
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 1
    vocab_size: int = 81
    d_model: int = 128
    n_heads: int = 4
    head_dim: int = 32
    d_ff: int = 512
    n_layers: int = 2
    context: int = 64

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        # A list from TOML or the CLI becomes a tuple, so the config stays hashable.
        object.__setattr__(self, "channels", tuple(self.channels))
        dims = (
            "in_channels", "image_size", "num_classes", "blocks_per_stage", "vocab_size",
            "d_model", "n_heads", "head_dim", "d_ff", "n_layers", "context",
        )  # fmt: skip
        for name in dims:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.channels or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels
        ):
            raise ConfigError(f"ModelConfig.channels must be integers >= 1, got {self.channels!r}")
        if self.arch == "cnn" and self.image_size < 2 ** len(self.channels):
            raise ConfigError(
                f"a {len(self.channels)}-block CNN halves the image {len(self.channels)} times: "
                f"image_size must be >= {2 ** len(self.channels)}, got {self.image_size}"
            )

    @property
    def task(self) -> str:
        """"classification" for the image models, "lm" for the char-LM."""
        return "lm" if self.arch == "charlm" else "classification"


# ---------------------------------------------------------------- scaled layers


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


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed from elementwise ops and means.

    ONNX exports F.group_norm as InstanceNormalization, for which
    onnxruntime-training 1.19 registers no gradient; this forward exports as
    ReduceMean/Sub/Mul/Div/Sqrt, which train everywhere. Same parameters,
    same outputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        batch = x.shape[0]
        grouped = x.reshape(batch, self.num_groups, -1)  # (B, C, H, W) -> (B, G, C/G*H*W)
        mean = grouped.mean(dim=-1, keepdim=True)
        centered = grouped - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        normed = (centered / torch.sqrt(var + self.eps)).reshape(x.shape)
        affine_shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        return normed * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (over the last axis) computed from elementwise ops and means.

    ONNX opset 17 exports F.layer_norm as one LayerNormalization node without
    its mean/inv-std outputs, which onnxruntime-training's gradient needs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        return centered / torch.sqrt(var + self.eps) * self.weight + self.bias


class SplitModel(nn.Module):
    """A model built at some widths; `forward(x) -> (logits, z)`.

    Attributes:
        config: the architecture.
        widths: units held per width group (every group named).
    """

    def __init__(self, config: ModelConfig, widths: Mapping[str, int]) -> None:
        super().__init__()
        self.config = config
        self.widths = dict(widths)

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
        spec = model_spec(self.config)
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


def _axes(*pairs: tuple[str, int], unit_size: int = 1) -> list[TensorAxis]:
    return [TensorAxis(tensor, axis, unit_size) for tensor, axis in pairs]


def _norm_axes(prefix: str) -> list[TensorAxis]:
    return _axes((f"{prefix}.weight", 0), (f"{prefix}.bias", 0))


# ---------------------------------------------------------------- CNN


def _cnn_spec(cfg: ModelConfig) -> ModelSpec:
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
        axes = _axes((f"blocks.{i}.conv.weight", 0), (f"blocks.{i}.conv.bias", 0))
        axes += _norm_axes(f"blocks.{i}.norm") + _axes((consumer, 1))
        groups.append(WidthGroup(f"conv{i}", c, tuple(axes)))
    return ModelSpec("cnn", shapes, tuple(groups))


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, in_scale: float) -> None:
        super().__init__()
        self.conv = ScaledConv2d(c_in, c_out, 3, padding=1, in_scale=in_scale)
        self.norm = GroupNorm(1, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)  # (B, c, H, W) -> (B, c, H/2, W/2)


class _Cnn(SplitModel):
    def __init__(self, cfg: ModelConfig, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__(cfg, widths)
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


def _cnn_flops(cfg: ModelConfig, widths: Widths) -> int:
    total, side, c_in = 0, cfg.image_size, cfg.in_channels
    for i in range(len(cfg.channels)):
        c_out = widths[f"conv{i}"]
        total += side * side * c_out * c_in * 9
        side, c_in = side // 2, c_out
    return total + c_in * cfg.num_classes


# ---------------------------------------------------------------- ResNet


def _resnet_layout(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """(stage, block, stride) of every residual block, in order."""
    return [
        (s, b, 2 if s > 0 and b == 0 else 1)
        for s in range(len(cfg.channels))
        for b in range(cfg.blocks_per_stage)
    ]


def _has_shortcut_conv(stage: int, block: int) -> bool:
    # The stem outputs channels[0], so only the first block of stages >= 1
    # (stride 2, new width) needs a projection shortcut.
    return stage > 0 and block == 0


def _resnet_spec(cfg: ModelConfig) -> ModelSpec:
    ch = cfg.channels
    shapes: dict[str, tuple[int, ...]] = {
        "stem.conv.weight": (ch[0], cfg.in_channels, 3, 3),
        "stem.norm.weight": (ch[0],),
        "stem.norm.bias": (ch[0],),
    }
    stream: dict[int, list[TensorAxis]] = {0: _axes(("stem.conv.weight", 0)) + _norm_axes("stem.norm")}
    mids = []
    for s, b, _ in _resnet_layout(cfg):
        p = f"stages.{s}.{b}"
        c_in = ch[s - 1] if b == 0 and s > 0 else ch[s]
        in_stream = s - 1 if b == 0 and s > 0 else s
        shapes[f"{p}.conv1.weight"] = (ch[s], c_in, 3, 3)
        shapes[f"{p}.norm1.weight"] = shapes[f"{p}.norm1.bias"] = (ch[s],)
        shapes[f"{p}.conv2.weight"] = (ch[s], ch[s], 3, 3)
        shapes[f"{p}.norm2.weight"] = shapes[f"{p}.norm2.bias"] = (ch[s],)
        mid = _axes((f"{p}.conv1.weight", 0)) + _norm_axes(f"{p}.norm1") + _axes((f"{p}.conv2.weight", 1))
        mids.append(WidthGroup(f"stage{s}.block{b}", ch[s], tuple(mid)))
        stream[in_stream] += _axes((f"{p}.conv1.weight", 1))
        stream.setdefault(s, [])
        stream[s] += _axes((f"{p}.conv2.weight", 0)) + _norm_axes(f"{p}.norm2")
        if _has_shortcut_conv(s, b):
            shapes[f"{p}.shortcut.conv.weight"] = (ch[s], c_in, 1, 1)
            shapes[f"{p}.shortcut.norm.weight"] = shapes[f"{p}.shortcut.norm.bias"] = (ch[s],)
            stream[in_stream] += _axes((f"{p}.shortcut.conv.weight", 1))
            stream[s] += _axes((f"{p}.shortcut.conv.weight", 0)) + _norm_axes(f"{p}.shortcut.norm")
    shapes["classifier.weight"] = (cfg.num_classes, ch[-1])
    shapes["classifier.bias"] = (cfg.num_classes,)
    stream[len(ch) - 1] += _axes(("classifier.weight", 1))
    groups = [WidthGroup(f"stage{s}", ch[s], tuple(stream[s])) for s in range(len(ch))]
    return ModelSpec("resnet", shapes, tuple(groups + mids))


class _NormedConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, in_scale: float) -> None:
        super().__init__()
        self.conv = ScaledConv2d(
            c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False, in_scale=in_scale
        )
        self.norm = GroupNorm(1, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.conv(x))
        return out


class _BasicBlock(nn.Module):
    def __init__(
        self, c_in: int, mid: int, c_out: int, stride: int, in_scale: float, mid_scale: float,
        projection: bool,
    ) -> None:  # fmt: skip
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


class _ResNet(SplitModel):
    def __init__(self, cfg: ModelConfig, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__(cfg, widths)
        self.stem = _NormedConv(cfg.in_channels, widths["stage0"], 3, 1, 1.0)
        stages: list[list[nn.Module]] = [[] for _ in cfg.channels]
        for s, b, stride in _resnet_layout(cfg):
            in_group = f"stage{s - 1}" if b == 0 and s > 0 else f"stage{s}"
            mid = f"stage{s}.block{b}"
            stages[s].append(
                _BasicBlock(
                    widths[in_group], widths[mid], widths[f"stage{s}"], stride,
                    scales[in_group], scales[mid], _has_shortcut_conv(s, b),
                )  # fmt: skip
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


def _resnet_flops(cfg: ModelConfig, widths: Widths) -> int:
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


# ---------------------------------------------------------------- char-LM


def _charlm_spec(cfg: ModelConfig) -> ModelSpec:
    d, inner, d_ff, vocab = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_ff, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (vocab, d),
        "pos_emb.weight": (cfg.context, d),
    }
    embed = _axes(("tok_emb.weight", 1), ("pos_emb.weight", 1))
    groups = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        shapes[f"{p}.ln1.weight"] = shapes[f"{p}.ln1.bias"] = (d,)
        heads: list[TensorAxis] = []
        for proj in ("q", "k", "v"):
            shapes[f"{p}.attn.{proj}.weight"] = (inner, d)
            shapes[f"{p}.attn.{proj}.bias"] = (inner,)
            embed += _axes((f"{p}.attn.{proj}.weight", 1))
            heads += _axes(
                (f"{p}.attn.{proj}.weight", 0), (f"{p}.attn.{proj}.bias", 0), unit_size=cfg.head_dim
            )
        shapes[f"{p}.attn.out.weight"] = (d, inner)
        shapes[f"{p}.attn.out.bias"] = (d,)
        heads += _axes((f"{p}.attn.out.weight", 1), unit_size=cfg.head_dim)
        shapes[f"{p}.ln2.weight"] = shapes[f"{p}.ln2.bias"] = (d,)
        shapes[f"{p}.ffn.fc_in.weight"] = (d_ff, d)
        shapes[f"{p}.ffn.fc_in.bias"] = (d_ff,)
        shapes[f"{p}.ffn.fc_out.weight"] = (d, d_ff)
        shapes[f"{p}.ffn.fc_out.bias"] = (d,)
        ffn = _axes((f"{p}.ffn.fc_in.weight", 0), (f"{p}.ffn.fc_in.bias", 0), (f"{p}.ffn.fc_out.weight", 1))
        embed += _norm_axes(f"{p}.ln1") + _norm_axes(f"{p}.ln2")
        embed += _axes((f"{p}.attn.out.weight", 0), (f"{p}.attn.out.bias", 0))
        embed += _axes((f"{p}.ffn.fc_in.weight", 1), (f"{p}.ffn.fc_out.weight", 0), (f"{p}.ffn.fc_out.bias", 0))
        groups.append(WidthGroup(f"layer{i}.heads", cfg.n_heads, tuple(heads)))
        groups.append(WidthGroup(f"layer{i}.ffn", d_ff, tuple(ffn)))
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (d,)
    shapes["head.weight"] = (vocab, d)
    shapes["head.bias"] = (vocab,)
    embed += _norm_axes("ln_f") + _axes(("head.weight", 1))
    return ModelSpec("charlm", shapes, (WidthGroup("embed", d, tuple(embed)), *groups))


class _CausalSelfAttention(nn.Module):
    mask: torch.Tensor

    def __init__(
        self, d: int, n_heads: int, head_dim: int, context: int, embed_scale: float, heads_scale: float
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.q = ScaledLinear(d, inner, in_scale=embed_scale)
        self.k = ScaledLinear(d, inner, in_scale=embed_scale)
        self.v = ScaledLinear(d, inner, in_scale=embed_scale)
        self.out = ScaledLinear(inner, d, in_scale=heads_scale)
        # Additive causal mask: a constant, not a parameter (not in state_dict).
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def _split_heads(self, x: torch.Tensor, batch: int, steps: int) -> torch.Tensor:
        # (B, T, H*hd) -> (B, H, T, hd)
        return x.reshape(batch, steps, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps = x.shape[0], x.shape[1]
        q = self._split_heads(self.q(x), batch, steps)
        k = self._split_heads(self.k(x), batch, steps)
        v = self._split_heads(self.v(x), batch, steps)
        # head_dim is never split, so the score needs no K/k factor.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        weights = torch.softmax(scores + self.mask[:steps, :steps], dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(batch, steps, self.n_heads * self.head_dim)
        out: torch.Tensor = self.out(y)
        return out


class _Ffn(nn.Module):
    def __init__(self, d: int, d_ff: int, embed_scale: float, ffn_scale: float) -> None:
        super().__init__()
        self.fc_in = ScaledLinear(d, d_ff, in_scale=embed_scale)
        self.fc_out = ScaledLinear(d_ff, d, in_scale=ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc_out(F.gelu(self.fc_in(x)))
        return out


class _TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__()
        d = widths["embed"]
        heads, ffn = f"layer{i}.heads", f"layer{i}.ffn"
        self.ln1 = LayerNorm(d)
        self.attn = _CausalSelfAttention(
            d, widths[heads], cfg.head_dim, cfg.context, scales["embed"], scales[heads]
        )
        self.ln2 = LayerNorm(d)
        self.ffn = _Ffn(d, widths[ffn], scales["embed"], scales[ffn])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.ffn(self.ln2(x))
        return out


class _CharLM(SplitModel):
    def __init__(self, cfg: ModelConfig, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__(cfg, widths)
        d = widths["embed"]
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.context, d)
        self.layers = nn.ModuleList(_TransformerLayer(cfg, i, widths, scales) for i in range(cfg.n_layers))
        self.ln_f = LayerNorm(d)
        self.head = ScaledLinear(d, cfg.vocab_size, in_scale=scales["embed"])
        for module in self.modules():  # GPT-2's init: N(0, 0.02) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tok_emb(x) + self.pos_emb.weight[: x.shape[1]]  # (B, T) -> (B, T, d)
        for layer in self.layers:
            h = layer(h)
        h = self.ln_f(h)
        return self.head(h), h.mean(dim=1)


def _charlm_flops(cfg: ModelConfig, widths: Widths) -> int:
    d, steps = widths["embed"], cfg.context
    per_token = d * cfg.vocab_size
    attention = 0
    for i in range(cfg.n_layers):
        inner = widths[f"layer{i}.heads"] * cfg.head_dim
        per_token += 4 * d * inner + 2 * d * widths[f"layer{i}.ffn"]
        attention += 2 * steps * steps * inner  # Q K^T and weights @ V
    return steps * per_token + attention


# ---------------------------------------------------------------- small models


def _cnn_shrunk(cfg: ModelConfig, widths: Widths) -> ModelConfig:
    return replace(cfg, channels=tuple(widths[f"conv{i}"] for i in range(len(cfg.channels))))


def _resnet_shrunk(cfg: ModelConfig, widths: Widths) -> ModelConfig:
    return replace(cfg, channels=tuple(widths[f"stage{i}"] for i in range(len(cfg.channels))))


def _charlm_shrunk(cfg: ModelConfig, widths: Widths) -> ModelConfig:
    return replace(cfg, d_model=widths["embed"], n_heads=widths["layer0.heads"], d_ff=widths["layer0.ffn"])


# ---------------------------------------------------------------- public API


@dataclass(frozen=True)
class _Arch:
    spec: Callable[[ModelConfig], ModelSpec]
    module: Callable[[ModelConfig, Widths, Mapping[str, float]], SplitModel]
    flops: Callable[[ModelConfig, Widths], int]
    shrunk: Callable[[ModelConfig, Widths], ModelConfig]


_REGISTRY: dict[str, _Arch] = {
    "cnn": _Arch(_cnn_spec, _Cnn, _cnn_flops, _cnn_shrunk),
    "resnet": _Arch(_resnet_spec, _ResNet, _resnet_flops, _resnet_shrunk),
    "charlm": _Arch(_charlm_spec, _CharLM, _charlm_flops, _charlm_shrunk),
}


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
        return arch.module(cfg, resolved, scales)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return arch.module(cfg, resolved, scales)


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


def state_to_numpy(module: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """Detached float32 copies of every tensor of `module.state_dict()`."""
    return {
        name: tensor.detach().cpu().to(torch.float32).numpy().copy()
        for name, tensor in module.state_dict().items()
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
