"""The PyTorch reference for training artifacts, and the check every new artifact must pass.

`validate_artifact` loads an artifact in its own runtime, trains a few steps
from given weights on given batches, and compares the losses and the updated
weights with `reference_train` (LocalObjective + the same optimizer in torch
eager). Exporters build their graphs from `build_objective`, so the artifact
and the reference are the same module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import torch

from msfusion.edge_runtime.backends.base import make_backend
from msfusion.errors import ArtifactError
from msfusion.export.objective import Batch, Weights, random_batch, random_weights
from msfusion.export.versions import runtime_versions
from msfusion.models.config import LossConfig, ModelConfig
from msfusion.models.layers import traceable_norms
from msfusion.models.objective import build_objective, train_objective
from msfusion.models.registry import (
    model_spec,
    resolve_widths,
    state_to_numpy,
)
from msfusion.wire.artifacts import (
    ArtifactManifest,
    OptimizerConfig,
    load_manifest,
    reference_weights,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact must track the PyTorch reference.

    AdamW divides each gradient element by its own running magnitude, so an
    element whose gradient is near zero (|g| ~ eps) turns float32 rounding
    noise into a step of up to lr; on a 25M-parameter sub-model one step left
    6 of 25.3M elements beyond 1e-4 (99.99th percentile 2.3e-6). After AdamW
    steps a share `adamw_outlier_share` of the elements may therefore leave
    `weight_atol`, each still within AdamW's own bound (lr per step, twice for
    safety) of the reference; a wrong gradient or update moves far more
    elements than that. The share is per tensor and at least one element, so a
    small tensor (a bias) gets one: a wrong bias gradient moves most of its
    elements, never its share of a large model's allowance (with XNNPACK's
    matrix products, the char-LM at width 1/2 left one of fc_in.bias's 256
    elements 1.4e-4 off after one step). SGD's update is linear in the
    gradient: no outliers.

    Attributes:
        loss_rtol: relative tolerance on every step's loss.
        weight_atol: absolute tolerance on every trained weight element.
        adamw_outlier_share: share of elements that may exceed weight_atol after AdamW steps.
    """

    loss_rtol: float = 1e-4
    weight_atol: float = 1e-4
    adamw_outlier_share: float = 1e-5


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of one validation run (only returned when it passed)."""

    losses: tuple[float, ...]
    reference_losses: tuple[float, ...]
    max_weight_error: float
    worst_tensor: str


def reference_train(
    model_cfg: ModelConfig,
    widths: Mapping[str, int],
    loss: LossConfig,
    optimizer: OptimizerConfig,
    trainable: Mapping[str, npt.NDArray[np.float32]],
    global_ref: Mapping[str, npt.NDArray[np.float32]] | None,
    prev_ref: Mapping[str, npt.NDArray[np.float32]] | None,
    batches: Sequence[Batch],
    lr: float,
) -> tuple[list[float], Weights]:
    """Train in torch eager exactly as an artifact should.

    Returns:
        The loss of every step (before its update) and the final trainable weights.
    """
    objective = build_objective(model_cfg, widths, loss, trainable, global_ref, prev_ref)
    steps = ((torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y))) for x, y in batches)
    with traceable_norms():  # the very function the artifact was traced from
        losses = train_objective(objective, steps, optimizer, lr)
    return losses, state_to_numpy(objective.model)


def compare(
    losses: Sequence[float],
    weights: Mapping[str, npt.NDArray[np.float32]],
    reference_losses: Sequence[float],
    reference_weights_: Mapping[str, npt.NDArray[np.float32]],
    tolerance: Tolerance,
    what: str,
    outlier_bound: float = 0.0,
) -> ValidationReport:
    """Check a run against the reference and say which part is at fault.

    The first step's loss comes from the starting weights, so a mismatch there
    is the forward graph or the loss; a mismatch only later, or in the trained
    weights, is the backward graph or the optimizer update.

    With `outlier_bound` > 0 (AdamW: see `Tolerance`), up to a share
    `tolerance.adamw_outlier_share` of each tensor's elements (rounded down,
    at least one) may differ by more than `weight_atol` but at most
    `outlier_bound`.

    Raises:
        ArtifactError: naming the first step whose loss differs and the tensor
            that drifted furthest.
    """
    worst, error = "", 0.0
    outliers, allowed, over_share = 0, 0, False
    for name, want in reference_weights_.items():
        if name not in weights:
            raise ArtifactError(f"{what}: the runtime returned no tensor {name!r}")
        got = weights[name]
        if got.shape != want.shape:
            raise ArtifactError(f"{what}: tensor {name!r} came back as {got.shape}, expected {want.shape}")
        gaps = np.abs(got - want)
        diff = float(np.max(gaps)) if got.size else 0.0
        diff = diff if np.isfinite(diff) else float("inf")
        # Counted per tensor: a small tensor (a bias) gets one element, so its wrong gradient
        # cannot hide in a large model's share.
        beyond = int(np.count_nonzero(~(gaps <= tolerance.weight_atol)))  # NaN counts as beyond
        tensor_allowed = max(1, int(tolerance.adamw_outlier_share * got.size)) if outlier_bound > 0 else 0
        outliers, allowed = outliers + beyond, allowed + tensor_allowed
        over_share = over_share or beyond > tensor_allowed
        if diff > error or not worst:
            worst, error = name, diff
    weights_ok = error <= tolerance.weight_atol or (not over_share and error <= outlier_bound)
    bad_steps = [
        step
        for step, (got_loss, want_loss) in enumerate(zip(losses, reference_losses))
        if not np.isfinite(got_loss) or abs(got_loss - want_loss) > tolerance.loss_rtol * max(abs(want_loss), 1e-12)
    ]
    if bad_steps and bad_steps[0] == 0:
        raise ArtifactError(
            f"{what}: the first loss {losses[0]:.7g} differs from the PyTorch reference "
            f"{reference_losses[0]:.7g} (rtol {tolerance.loss_rtol:g}): the forward graph or the loss is wrong"
        )
    if bad_steps or not weights_ok:
        where = f"the loss first differs at step {bad_steps[0]}; " if bad_steps else ""
        share = f", {outliers} elements beyond it (allowed {allowed}, per tensor)" if outlier_bound > 0 else ""
        raise ArtifactError(
            f"{what}: after {len(losses)} step(s) tensor {worst!r} differs from the PyTorch reference by "
            f"{error:.3g} (atol {tolerance.weight_atol:g}{share}); {where}the forward pass matched, so the gradient "
            f"or the optimizer update on the path to {worst!r} is wrong"
        )
    return ValidationReport(tuple(losses), tuple(reference_losses), error, worst)


def validate_artifact(
    artifact_dir: Path,
    model_cfg: ModelConfig,
    widths: Mapping[str, int] | None,
    loss: LossConfig,
    *,
    trainable: Mapping[str, npt.NDArray[np.float32]] | None = None,
    global_ref: Mapping[str, npt.NDArray[np.float32]] | None = None,
    prev_ref: Mapping[str, npt.NDArray[np.float32]] | None = None,
    batches: Sequence[Batch] | None = None,
    lr: float | None = None,
    steps: int = 1,
    seed: int = 0,
    tolerance: Tolerance = Tolerance(),
) -> ValidationReport:
    """Load an artifact in its runtime, train, and compare with the PyTorch reference.

    Weights and batches default to seeded random ones (`random_weights`, `random_batch`).

    AdamW and zero gradients: a tensor whose true gradient is exactly zero
    (an attention key bias: softmax ignores a shift shared by all keys) gets
    gradients of pure rounding noise, which AdamW normalizes into steps of up
    to lr in a direction that differs between runtimes. The AdamW default lr
    of 1e-3 keeps that below the weight tolerance for a few steps.

    Args:
        artifact_dir: the artifact directory (manifest and files).
        model_cfg: architecture the artifact was exported from.
        widths: units per group (None: full width).
        loss: contrastive knobs the artifact was exported with.
        trainable: starting sub-model weights.
        global_ref: frozen global reference (defaults to `trainable`, as in round 1).
        prev_ref: frozen previous local reference (defaults to other random weights).
        batches: the batches to train on (defaults to `steps` random ones).
        lr: learning rate (default: 0.05 for SGD, 1e-3 for AdamW; see below).
        steps: number of random batches when `batches` is None.
        seed: seeds the default weights and batches.
        tolerance: how close the run must track the reference.

    Returns:
        The report of a passing run.

    Raises:
        ArtifactError: the runtime cannot load or run the artifact (naming the
            version or op at fault), or its losses or weights leave the tolerance.
    """
    manifest = load_manifest(Path(artifact_dir))
    widths = resolve_widths(model_spec(model_cfg), widths)
    rng = np.random.default_rng(seed)
    trainable = trainable if trainable is not None else random_weights(model_cfg, widths, seed)
    global_ref = global_ref if global_ref is not None else trainable
    prev_ref = prev_ref if prev_ref is not None else random_weights(model_cfg, widths, seed + 1)
    if batches is None:
        batches = [random_batch(model_cfg, manifest.batch_size, rng) for _ in range(steps)]
    lr = lr if lr is not None else (1e-3 if manifest.optimizer.name == "adamw" else 0.05)
    what = f"{manifest.kind.value} artifact {manifest.key[:12] or '(no key)'}"
    _check_versions(manifest, what)

    backend = make_backend(manifest.kind)
    try:
        backend.load(Path(artifact_dir), manifest)
        backend.set_weights(trainable, reference_weights(manifest, global_ref, prev_ref))
        losses = [backend.train_step(x, y, lr) for x, y in batches]
        weights = backend.weights()
    except ArtifactError as exc:
        raise ArtifactError(f"{what}: {exc}") from exc
    finally:
        backend.close()
    ref_losses, ref_weights = reference_train(
        model_cfg, widths, loss, manifest.optimizer, trainable, global_ref, prev_ref, batches, lr
    )
    # AdamW moves an element at most ~lr per step: rounding noise can do no more than that.
    bound = 2 * lr * len(batches) + tolerance.weight_atol if manifest.optimizer.name == "adamw" else 0.0
    report = compare(losses, weights, ref_losses, ref_weights, tolerance, what, outlier_bound=bound)
    log.info(
        "%s validated: losses %s, max weight error %.3g (%s)",
        what,
        losses,
        report.max_weight_error,
        report.worst_tensor,
    )
    return report


def _check_versions(manifest: ArtifactManifest, what: str) -> None:
    """Refuse an artifact exported for another runtime version than the one installed."""

    installed = runtime_versions(manifest.kind)
    for package, version in manifest.versions.items():
        if package in installed and installed[package] != version:
            raise ArtifactError(
                f"{what} was exported for {package} {version}, but {package} {installed[package]} is installed"
            )
