"""The causal Transformer char-LM: embedding, attention heads (units of head_dim) and FFN groups.

The architecture's file (see `registry.py`): `spec`, `Module`, `flops`, `shrunk`, `activations`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from msfusion.algorithm.spec import ModelSpec, TensorAxis, WidthGroup
from msfusion.models.config import ModelConfig
from msfusion.models.layers import (
    LayerNorm,
    ScaledLinear,
    SplitModel,
    axes_of,
    norm_axes,
)

Widths = Mapping[str, int]
_NORM_SAVED = 2  # our GroupNorm/LayerNorm keep the centered and the normalized tensor


def spec(cfg: ModelConfig) -> ModelSpec:
    d, inner, d_ff, vocab = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_ff, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (vocab, d),
        "pos_emb.weight": (cfg.context, d),
    }
    embed = axes_of(("tok_emb.weight", 1), ("pos_emb.weight", 1))
    groups = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        shapes[f"{p}.ln1.weight"] = shapes[f"{p}.ln1.bias"] = (d,)
        heads: list[TensorAxis] = []
        for proj in ("q", "k", "v"):
            shapes[f"{p}.attn.{proj}.weight"] = (inner, d)
            shapes[f"{p}.attn.{proj}.bias"] = (inner,)
            embed += axes_of((f"{p}.attn.{proj}.weight", 1))
            heads += axes_of((f"{p}.attn.{proj}.weight", 0), (f"{p}.attn.{proj}.bias", 0), unit_size=cfg.head_dim)
        shapes[f"{p}.attn.out.weight"] = (d, inner)
        shapes[f"{p}.attn.out.bias"] = (d,)
        heads += axes_of((f"{p}.attn.out.weight", 1), unit_size=cfg.head_dim)
        shapes[f"{p}.ln2.weight"] = shapes[f"{p}.ln2.bias"] = (d,)
        shapes[f"{p}.ffn.fc_in.weight"] = (d_ff, d)
        shapes[f"{p}.ffn.fc_in.bias"] = (d_ff,)
        shapes[f"{p}.ffn.fc_out.weight"] = (d, d_ff)
        shapes[f"{p}.ffn.fc_out.bias"] = (d,)
        ffn = axes_of((f"{p}.ffn.fc_in.weight", 0), (f"{p}.ffn.fc_in.bias", 0), (f"{p}.ffn.fc_out.weight", 1))
        embed += norm_axes(f"{p}.ln1") + norm_axes(f"{p}.ln2")
        embed += axes_of((f"{p}.attn.out.weight", 0), (f"{p}.attn.out.bias", 0))
        embed += axes_of((f"{p}.ffn.fc_in.weight", 1), (f"{p}.ffn.fc_out.weight", 0), (f"{p}.ffn.fc_out.bias", 0))
        groups.append(WidthGroup(f"layer{i}.heads", cfg.n_heads, tuple(heads)))
        groups.append(WidthGroup(f"layer{i}.ffn", d_ff, tuple(ffn)))
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (d,)
    shapes["head.weight"] = (vocab, d)
    shapes["head.bias"] = (vocab,)
    embed += norm_axes("ln_f") + axes_of(("head.weight", 1))
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
        self.attn = _CausalSelfAttention(d, widths[heads], cfg.head_dim, cfg.context, scales["embed"], scales[heads])
        self.ln2 = LayerNorm(d)
        self.ffn = _Ffn(d, widths[ffn], scales["embed"], scales[ffn])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.ffn(self.ln2(x))
        return out


class Module(SplitModel):
    def __init__(self, cfg: ModelConfig, widths: Widths, scales: Mapping[str, float]) -> None:
        super().__init__(cfg, widths, spec(cfg))
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


def flops(cfg: ModelConfig, widths: Widths) -> int:
    d, steps = widths["embed"], cfg.context
    per_token = d * cfg.vocab_size
    attention = 0
    for i in range(cfg.n_layers):
        inner = widths[f"layer{i}.heads"] * cfg.head_dim
        per_token += 4 * d * inner + 2 * d * widths[f"layer{i}.ffn"]
        attention += 2 * steps * steps * inner  # Q K^T and weights @ V
    return steps * per_token + attention


def shrunk(cfg: ModelConfig, widths: Widths) -> ModelConfig:
    return replace(cfg, d_model=widths["embed"], n_heads=widths["layer0.heads"], d_ff=widths["layer0.ffn"])


def activations(cfg: ModelConfig, widths: Widths) -> int:
    """Activation elements one sample (a window of `context` characters) of the char-LM keeps."""
    steps, d = cfg.context, widths["embed"]
    # q, k and v each scale their input: three private copies instead of one shared input.
    qkv_inputs = 3 if d != cfg.d_model else 1
    norm = _NORM_SAVED * steps * d + steps  # a LayerNorm also keeps its (T, 1) std
    total = 2 * steps  # the token ids (int64)
    for i in range(cfg.n_layers):
        heads, ffn = widths[f"layer{i}.heads"], widths[f"layer{i}.ffn"]
        inner = heads * cfg.head_dim
        total += norm + qkv_inputs * steps * d  # ln1, q/k/v's input
        total += 3 * steps * inner  # q, k, v (kept by the two attention matmuls)
        total += heads * steps * steps  # softmax output
        total += steps * inner  # merged heads: the out projection's input
        total += norm + steps * d  # ln2, fc_in's input
        total += 2 * steps * ffn  # gelu's input, fc_out's input
    total += norm + steps * d  # ln_f, the head's input
    return int(total + steps * cfg.vocab_size + 2 * steps)  # log-softmax of the logits, the targets (int64)
