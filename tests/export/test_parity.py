"""Parity: from the same weights and batches, every runtime (ORT, ExecuTorch, torch-native) tracks the PyTorch reference.

Tolerance (the one `export.validate.Tolerance` states): every step's loss
within rtol 1e-4, every trained weight within atol 1e-4 after 5 steps. The
reference is `LocalObjective` + torch.optim with identical hyper-parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.edge_runtime.backends.base import make_backend
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.export.validate import reference_train
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.registry import model_spec
from msfusion.wire.artifacts import ArtifactKind, OptimizerConfig, reference_weights

STEPS = 5
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
KINDS = [pytest.param(kind, id=kind.value) for kind in ArtifactKind]


def _run_both(
    artifact: CachedArtifact, model: ModelConfig, widths: dict[str, int], loss: LossConfig, lr: float
) -> tuple[list[float], dict[str, np.ndarray], list[float], dict[str, np.ndarray]]:
    trainable = random_weights(model, widths, seed=11)
    previous = random_weights(model, widths, seed=12)
    global_ref = random_weights(model, widths, seed=13)
    rng = np.random.default_rng(5)
    batches = [random_batch(model, artifact.manifest.batch_size, rng) for _ in range(STEPS)]

    backend = make_backend(artifact.manifest.kind)
    backend.load(artifact.path, artifact.manifest)
    backend.set_weights(trainable, reference_weights(artifact.manifest, global_ref, previous))
    losses = [backend.train_step(x, y, lr) for x, y in batches]
    weights = backend.weights()
    backend.close()

    ref_losses, ref_weights = reference_train(
        model, widths, loss, artifact.manifest.optimizer, trainable, global_ref, previous, batches, lr
    )
    return losses, weights, ref_losses, ref_weights


def _assert_parity(
    losses: list[float], weights: dict[str, np.ndarray], ref_losses: list[float], ref_weights: dict[str, np.ndarray]
) -> None:
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    assert sorted(weights) == sorted(ref_weights)
    for name, expected in ref_weights.items():
        np.testing.assert_allclose(weights[name], expected, rtol=0, atol=WEIGHT_ATOL, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss_name", ["moon", "ce_only"])
def test_cnn_sgd_momentum_tracks_torch(
    kind: ArtifactKind, loss_name: str, case: Any, exported: Callable[..., CachedArtifact]
) -> None:
    # Prepare
    loss = getattr(case, loss_name)
    artifact = exported(kind, loss=loss)
    # Execute
    losses, weights, ref_losses, ref_weights = _run_both(artifact, case.model, case.widths, loss, lr=0.05)
    # Assert
    _assert_parity(losses, weights, ref_losses, ref_weights)
    if loss_name == "moon":  # the contrastive term really is in the graph
        plain = reference_train(
            case.model,
            case.widths,
            case.ce_only,
            artifact.manifest.optimizer,
            random_weights(case.model, case.widths, seed=11),
            None,
            None,
            [random_batch(case.model, case.batch, np.random.default_rng(5))],
            0.05,
        )[0]
        assert abs(losses[0] - plain[0]) > 1e-3


@pytest.mark.parametrize("kind", [ArtifactKind.ORT, ArtifactKind.TORCH], ids=lambda kind: kind.value)
def test_sgd_weight_decay_and_adamw_track_torch(
    kind: ArtifactKind, case: Any, exported: Callable[..., CachedArtifact]
) -> None:
    for optimizer, lr in [
        (OptimizerConfig("sgd", momentum=0.5, weight_decay=0.01), 0.05),
        (OptimizerConfig("adamw", weight_decay=0.01), 1e-3),
    ]:
        artifact = exported(kind, optimizer=optimizer)
        _assert_parity(*_run_both(artifact, case.model, case.widths, case.moon, lr=lr))


@pytest.mark.slow
def test_executorch_adamw_tracks_torch(case: Any, exported: Callable[..., CachedArtifact]) -> None:
    artifact = exported(ArtifactKind.EXECUTORCH, optimizer=OptimizerConfig("adamw", weight_decay=0.01))
    _assert_parity(*_run_both(artifact, case.model, case.widths, case.moon, lr=1e-3))


SMALL_RESNET = ModelConfig(arch="resnet", in_channels=3, image_size=16, channels=(8, 16))
SMALL_CHARLM = ModelConfig(
    arch="charlm", vocab_size=24, d_model=32, n_heads=4, head_dim=8, d_ff=64, n_layers=2, context=16
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", [SMALL_RESNET, SMALL_CHARLM], ids=["resnet", "charlm"])
@pytest.mark.parametrize(
    "loss",
    [LossConfig(ContrastiveVariant.MOON, mu=0.5, tau=0.5), LossConfig(ContrastiveVariant.OFF)],
    ids=["moon", "ce_only"],
)
def test_resnet_and_charlm_track_torch(
    kind: ArtifactKind, model: ModelConfig, loss: LossConfig, exported: Callable[..., CachedArtifact]
) -> None:
    widths = widths_for_ratio(model_spec(model), 0.5)
    artifact = exported(kind, loss=loss, model=model, widths=widths)
    _assert_parity(*_run_both(artifact, model, widths, loss, lr=0.05))
