"""Sub-model + local objective -> a torch.export training program (.pt2) for the torch-native backend.

The program is the ExecuTorch exporter's loss graph (`export/executorch.py`,
`loss_program`: `build_objective` with the frozen references as inputs,
through `torch.export.export`), saved with `torch.export.save` and without
ExecuTorch's rewrites: the board runs torch's own kernels (conv2d, linear,
max_pool2d) and autograd, then the optimizer of the manifest
(edge_runtime/backends/torch_native.py). The placeholder weights traced into
the program are overwritten by `set_weights` on the device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from msfusion.edge_runtime.backends.torch_native import PROGRAM
from msfusion.errors import ArtifactError
from msfusion.export.executorch import loss_program
from msfusion.models.config import LossConfig, ModelConfig
from msfusion.wire.artifacts import ArtifactKind, ArtifactManifest, OptimizerConfig

log = logging.getLogger(__name__)


def export_submodel(
    model_cfg: ModelConfig,
    widths: Mapping[str, int] | None,
    loss: LossConfig,
    out_dir: Path,
    *,
    optimizer: str | OptimizerConfig = "sgd",
    batch_size: int = 32,
    key: str = "",
    seed: int = 0,
) -> ArtifactManifest:
    """Export the sub-model at `widths` with its local objective as a torch.export program.

    The optimizer is not part of the program: the device applies it to the
    gradients autograd computes (`ArtifactManifest.optimizer` says which one).

    Args:
        model_cfg: architecture.
        widths: units per group (None: full width).
        loss: contrastive knobs (baked into the graph).
        out_dir: directory to write the artifact into (created if missing).
        optimizer: "sgd" / "adamw" or a full configuration.
        batch_size: samples per step (static).
        key: the cache key to record in the manifest.
        seed: seeds the placeholder weights saved in the program (overwritten on the device).

    Returns:
        The manifest, also written as `out_dir/manifest.json`.

    Raises:
        ArtifactError: torch.export or saving failed.
    """
    optimizer = OptimizerConfig.of(optimizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = loss_program(model_cfg, widths, loss, batch_size, seed)
    try:
        torch.export.save(graph.program, out_dir / PROGRAM)
    except Exception as exc:  # noqa: BLE001 (serialization raises many types)
        raise ArtifactError(f"saving the torch.export program failed: {type(exc).__name__}: {exc}") from exc
    manifest = graph.manifest(
        ArtifactKind.TORCH, out_dir, [PROGRAM], arch=model_cfg.arch, key=key, optimizer=optimizer, loss=loss
    )
    log.info("exported torch program %s (%d bytes)", key[:12], (out_dir / PROGRAM).stat().st_size)
    return manifest
