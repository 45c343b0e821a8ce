"""The local objective: cross-entropy plus the contrastive term (msfusion.md, section 5).

L = CE(f_local(x), y) + mu * L_con, with, in MOON form,
L_con = -log( e^{sim(z, z_glob)/tau} / (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau}) ).
`LocalObjective` is the one module both the reference engine trains and the
exporters turn into on-device training artifacts.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from msfusion.errors import ConfigError
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.layers import SplitModel, scale_gradients, scaled_parameters
from msfusion.models.registry import build_model, load_numpy
from msfusion.wire.artifacts import OptimizerConfig


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
        model: SplitModel,
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
        return self.loss_given(x, y, *self.reference_representations(x))

    def reference_representations(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The frozen references' z_glob and z_prev for a batch (None where the term needs none), detached."""
        # detach, not no_grad(): both torch.onnx and torch.export trace it plainly.
        z_glob = self.global_ref(x)[1].detach() if self.global_ref is not None else None
        z_prev = self.prev_ref(x)[1].detach() if self.prev_ref is not None else None
        return z_glob, z_prev

    def loss_given(
        self, x: torch.Tensor, y: torch.Tensor, z_glob: torch.Tensor | None, z_prev: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss with the references' representations given (`reference_representations`).

        The ExecuTorch exporter trains this form for convolutional models, the representations computed
        by a separate program.
        """
        logits, z = self.model(x)
        loss = cross_entropy(logits, y)
        if not self.active:
            return loss
        if z_glob is None:
            raise ConfigError("the contrastive term needs the global representation")
        return loss + self.mu * contrastive_term(z, z_glob, z_prev, self.tau, self.variant)


def build_objective(
    model_cfg: ModelConfig,
    widths: Mapping[str, int],
    loss: LossConfig,
    trainable: Mapping[str, npt.NDArray[np.float32]],
    global_ref: Mapping[str, npt.NDArray[np.float32]] | None = None,
    prev_ref: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> LocalObjective:
    """The local objective of a sub-model, as both the exporters and the reference use it.

    Args:
        model_cfg: architecture.
        widths: units per group of the sub-model.
        loss: contrastive knobs.
        trainable: the sub-model's weights (spec names).
        global_ref: the frozen global sub-model (needed when the term is on).
        prev_ref: the frozen previous local sub-model (MOON; None uses `global_ref`).

    Returns:
        The objective in training mode; only `objective.model` requires grad.
    """
    model = build_model(model_cfg, widths)
    load_numpy(model, trainable)
    global_model = prev_model = None
    if loss.active:
        if global_ref is None:
            raise ConfigError("the contrastive term needs the global reference weights")
        global_model = build_model(model_cfg, widths)
        load_numpy(global_model, global_ref)
        if loss.variant is ContrastiveVariant.MOON:
            prev_model = build_model(model_cfg, widths)
            load_numpy(prev_model, prev_ref if prev_ref is not None else global_ref)
    objective = LocalObjective(model, global_model, prev_model, loss.mu, loss.tau, loss.variant)
    objective.train()
    return objective


def make_optimizer(params: list[torch.nn.Parameter], optimizer: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """The one torch optimizer factory: what every artifact's optimizer reproduces and the reference engine runs."""
    if optimizer.name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=optimizer.betas, eps=optimizer.eps, weight_decay=optimizer.weight_decay
        )
    return torch.optim.SGD(params, lr=lr, momentum=optimizer.momentum, weight_decay=optimizer.weight_decay)


def train_objective(
    objective: LocalObjective,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: OptimizerConfig,
    lr: float,
) -> list[float]:
    """The reference local training loop: one optimizer step per batch, scaler compensation included.

    Both the reference engine (`coordinator/reference/engine.py`) and artifact
    validation (`export/validate.py`) train through this loop, so an artifact
    is checked against exactly what the engine runs.

    Returns:
        The loss of every step (before its update); `objective.model` holds the trained weights.
    """
    opt = make_optimizer(list(objective.model.parameters()), optimizer, lr)
    compensated = scaled_parameters(objective.model, objective.model.gradient_scales() if optimizer.compensates else {})
    losses = []
    for x, y in batches:
        value = objective(x, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        scale_gradients(compensated)
        opt.step()
        losses.append(float(value.detach()))
    return losses
