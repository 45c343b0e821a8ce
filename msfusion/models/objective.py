"""The local objective: cross-entropy plus the contrastive term (msfusion.md, section 5).

L = CE(f_local(x), y) + mu * L_con, with, in MOON form,
L_con = -log( e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}) ).
`LocalObjective` is the one module both the reference engine trains and the
exporters turn into on-device training artifacts.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from msfusion.errors import ConfigError


class ContrastiveVariant(str, enum.Enum):
    """Which contrastive term is added to the cross-entropy."""

    OFF = "off"  # plain cross-entropy
    POSITIVE = "positive"  # pull towards the global sub-model only: (1 - sim(z, z_glob)) / tau
    MOON = "moon"  # MOON: towards global, away from the previous local sub-model


def contrastive_term(
    z: torch.Tensor,
    z_glob: torch.Tensor,
    z_prev: torch.Tensor | None,
    tau: float,
    variant: ContrastiveVariant,
) -> torch.Tensor:
    """Batch mean of the contrastive term for representations z (B, d).

    Raises:
        ConfigError: MOON without a previous representation, or tau <= 0.
    """
    if tau <= 0:
        raise ConfigError(f"tau must be > 0, got {tau}")
    sim_glob = F.cosine_similarity(z, z_glob, dim=-1) / tau
    if variant is ContrastiveVariant.POSITIVE:
        return (1.0 / tau - sim_glob).mean()
    if variant is ContrastiveVariant.MOON:
        if z_prev is None:
            raise ConfigError("the MOON term needs the previous local representation")
        sim_prev = F.cosine_similarity(z, z_prev, dim=-1) / tau
        logits = torch.stack([sim_glob, sim_prev], dim=-1)
        return (torch.logsumexp(logits, dim=-1) - sim_glob).mean()
    return torch.zeros((), dtype=z.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; LM logits (B, T, V) and targets (B, T) are flattened."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LocalObjective(nn.Module):
    """A sub-model with its local loss; the references are frozen copies.

    Args:
        model: the sub-model being trained; forward(x) -> (logits, z).
        global_ref: the frozen global sub-model received this round (None when off).
        prev_ref: the frozen previous local sub-model, re-sliced (MOON only).
        mu: weight of the contrastive term.
        tau: temperature.
        variant: off, positive or moon.
    """

    def __init__(
        self,
        model: nn.Module,
        global_ref: nn.Module | None = None,
        prev_ref: nn.Module | None = None,
        mu: float = 0.0,
        tau: float = 0.5,
        variant: ContrastiveVariant = ContrastiveVariant.OFF,
    ) -> None:
        super().__init__()
        if mu < 0:
            raise ConfigError(f"mu must be >= 0, got {mu}")
        self.active = variant is not ContrastiveVariant.OFF and mu > 0
        if self.active and global_ref is None:
            raise ConfigError("the contrastive term needs the global sub-model")
        if self.active and variant is ContrastiveVariant.MOON and prev_ref is None:
            raise ConfigError("the MOON term needs the previous local sub-model")
        self.model = model
        self.global_ref = global_ref if self.active else None
        self.prev_ref = prev_ref if self.active and variant is ContrastiveVariant.MOON else None
        for ref in (self.global_ref, self.prev_ref):
            if ref is not None:
                for p in ref.parameters():
                    p.requires_grad_(False)
        self.mu = float(mu)
        self.tau = float(tau)
        self.variant = variant

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar loss CE + mu * L_con for a batch."""
        logits, z = self.model(x)
        loss = cross_entropy(logits, y)
        if self.global_ref is None:
            return loss
        # detach, not no_grad(): both torch.onnx and torch.export trace it plainly.
        z_glob = self.global_ref(x)[1].detach()
        z_prev = self.prev_ref(x)[1].detach() if self.prev_ref is not None else None
        return loss + self.mu * contrastive_term(z, z_glob, z_prev, self.tau, self.variant)
