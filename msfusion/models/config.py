"""What a model is, as plain data (no torch): the architecture's configuration and the objective's knobs.

`ModelConfig` names an architecture and its dimensions; `LossConfig` the local
objective's contrastive term (msfusion.md, section 5). Both sides read them:
the coordinator builds modules from them (`msfusion.models.registry`), sizing
and run files parse them without torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

from msfusion.data.sources import ModelInputs
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
            "in_channels",
            "image_size",
            "num_classes",
            "blocks_per_stage",
            "vocab_size",
            "d_model",
            "n_heads",
            "head_dim",
            "d_ff",
            "n_layers",
            "context",
        )
        for name in dims:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise ConfigError(f"ModelConfig.channels must be integers >= 1, got {self.channels!r}")
        if self.arch == "cnn" and self.image_size < 2 ** len(self.channels):
            raise ConfigError(
                f"a {len(self.channels)}-block CNN halves the image {len(self.channels)} times: "
                f"image_size must be >= {2 ** len(self.channels)}, got {self.image_size}"
            )

    @property
    def task(self) -> str:
        """ "classification" for the image models, "lm" for the char-LM."""
        return "lm" if self.arch == "charlm" else "classification"

    def inputs(self) -> ModelInputs:
        """What the model takes, to check a device's data against (`data.sources.check_report`)."""
        if self.task == "lm":
            return ModelInputs(task="lm", vocab_size=self.vocab_size, context=self.context)
        shape = (self.in_channels, self.image_size, self.image_size)
        return ModelInputs(task="classification", sample_shape=shape, num_classes=self.num_classes)


class ContrastiveVariant(str, enum.Enum):
    """Which contrastive term is added to the cross-entropy."""

    OFF = "off"  # plain cross-entropy
    POSITIVE = "positive"  # pull towards the global sub-model only: (1 - sim(z, z_glob)) / tau
    MOON = "moon"  # MOON: towards global, away from the previous local sub-model


@dataclass(frozen=True)
class LossConfig:
    """The local objective's contrastive term (msfusion.md, section 5).

    The default is the full method: MOON's term (towards the global
    sub-model, away from the device's previous local one) at mu 0.1;
    `variant = "off"` trains on plain cross-entropy (an ablation).
    """

    variant: ContrastiveVariant = ContrastiveVariant.MOON
    mu: float = 0.1
    tau: float = 0.5

    @property
    def active(self) -> bool:
        """Whether the contrastive term is on."""
        return self.variant is not ContrastiveVariant.OFF and self.mu > 0
