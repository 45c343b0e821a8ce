"""Element counts of sub-models: parameters and activations per sample, by width (no torch).

The memory model (`coordinator/fleet/memory_model.py`) needs, for any width, how many
parameters the sub-model has (weights, gradients and optimizer state scale
with it) and how many activation elements one sample keeps for the backward
pass. Parameters come from the `ModelSpec`. Activations are counted here from
the architecture's dimensions, tensor by tensor, as the `msfusion/models/registry.py`
modules keep them under autograd (int64 tensors count twice: the unit is a
float32 element); a test checks the counts against the tensors torch's
autograd saves. The exported backends keep about the same tensors; the fitted
bytes per activation absorbs the difference.

`model_sizes(cfg)` builds both counts for a `ModelConfig` (it imports the
models module, so torch, on the coordinator); the per-arch counting functions
themselves take the config's plain attributes and run anywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

Widths = Mapping[str, int]
_NORM_SAVED = 2  # our GroupNorm/LayerNorm keep the centered and the normalized tensor


@dataclass(frozen=True)
class ModelSizes:
    """A model's element counts as functions of the uniform width ratio.

    Attributes:
        param_count: ratio -> parameters of the sub-model.
        activation_elements: ratio -> activation elements of one sample.
    """

    param_count: Callable[[float], int]
    activation_elements: Callable[[float], int]


def _scaled_copy(elements: int, k: int, full: int) -> int:
    """The scaler's multiply (K/k != 1) gives a layer a private copy of its input to keep."""
    return elements if k != full else 0


def cnn_activations(cfg: Any, widths: Widths) -> int:
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


def resnet_activations(cfg: Any, widths: Widths) -> int:
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
            total += copies * _scaled_copy(c_in * side * side, c_in, c_in_full)
            if first:
                side = (side - 1) // 2 + 1
            total += (_NORM_SAVED + 1) * mid * side * side  # norm1, relu1 (conv2's input)
            total += _scaled_copy(mid * side * side, mid, ch[s])
            total += (_NORM_SAVED + 1) * c_out * side * side  # norm2, the final relu
            if first:
                total += _NORM_SAVED * c_out * side * side  # the shortcut's norm
    last = widths[f"stage{len(ch) - 1}"]
    return int(total + last + cfg.num_classes)


def charlm_activations(cfg: Any, widths: Widths) -> int:
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


ACTIVATIONS: Mapping[str, Callable[[Any, Widths], int]] = {
    "cnn": cnn_activations,
    "resnet": resnet_activations,
    "charlm": charlm_activations,
}


def model_sizes(cfg: Any) -> ModelSizes:
    """Parameter and activation counts of a `ModelConfig`'s sub-models by width ratio.

    Imports `msfusion.models.registry` (torch): call it on the coordinator.
    """
    from msfusion.models.registry import model_spec
    from msfusion.algorithm.spec import widths_for_ratio

    spec = model_spec(cfg)
    count_activations = ACTIVATIONS[cfg.arch]

    # Cached: sizing a device evaluates every ratio k/1024, for every budget asked.
    @functools.lru_cache(maxsize=4096)
    def param_count(ratio: float) -> int:
        return int(spec.param_count(widths_for_ratio(spec, ratio)))

    @functools.lru_cache(maxsize=4096)
    def activation_elements(ratio: float) -> int:
        return count_activations(cfg, widths_for_ratio(spec, ratio))

    return ModelSizes(param_count=param_count, activation_elements=activation_elements)
