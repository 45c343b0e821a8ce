"""Artifact cache: export a sub-model's training artifact once per graph-shaping key.

The graph depends only on the architecture, the sub-model's widths, the loss
knobs, the optimizer, the batch size, the backend and the versions of the
tools that wrote it; never on weights. `artifact_key` hashes exactly those, so
a new round re-uses the artifact and only the weights travel.

Layout on disk: `<root>/<kind>/<key>/` holds the artifact's files and its
`manifest.json`. An entry is written to a temporary folder and renamed into
place, so a crashed export never leaves a half-written entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from msfusion.errors import ArtifactError
from msfusion.export.versions import runtime_versions
from msfusion.models.config import LossConfig, ModelConfig
from msfusion.models.registry import model_spec, resolve_widths
from msfusion.progress import ProgressCallback, step
from msfusion.wire.artifacts import (
    ArtifactKind,
    ArtifactManifest,
    OptimizerConfig,
    load_manifest,
)

log = logging.getLogger(__name__)

Exporter = Callable[..., ArtifactManifest]


def artifact_key(
    model_cfg: ModelConfig,
    widths: Mapping[str, int] | None,
    loss: LossConfig,
    optimizer: str | OptimizerConfig,
    batch_size: int,
    kind: ArtifactKind,
    versions: Mapping[str, str] | None = None,
) -> str:
    """The sha256 naming an artifact: everything its graph depends on, and nothing else.

    Args:
        model_cfg: architecture.
        widths: units per group (None: full width; missing groups are full).
        loss: contrastive knobs (every inactive setting hashes as plain cross-entropy).
        optimizer: optimizer name or configuration.
        batch_size: samples per step.
        kind: backend.
        versions: tool versions (default: the installed ones).

    Returns:
        64 hex digits.
    """
    from msfusion.export.objective import loss_signature

    kind = ArtifactKind(kind)
    payload = {
        "model": dataclasses.asdict(model_cfg),
        "widths": resolve_widths(model_spec(model_cfg), widths),
        "loss": loss_signature(loss),
        "optimizer": dataclasses.asdict(OptimizerConfig.of(optimizer)),
        "batch_size": int(batch_size),
        "kind": kind.value,
        "versions": dict(versions) if versions is not None else runtime_versions(kind),
    }
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedArtifact:
    """An artifact in the cache: its manifest, its directory, and whether it was already there."""

    manifest: ArtifactManifest
    path: Path
    hit: bool
    export_s: float = 0.0


def default_exporter(kind: ArtifactKind) -> Exporter:
    """The `export_submodel` of `kind`'s exporter (imported on first use: all are heavy)."""
    kind = ArtifactKind(kind)
    if kind is ArtifactKind.ORT:
        from msfusion.export.onnx_training import export_submodel

        return export_submodel
    if kind is ArtifactKind.TORCH:
        from msfusion.export.torch_native import export_submodel as export_torch

        return export_torch
    from msfusion.export.executorch import export_submodel as export_executorch

    return export_executorch


class ArtifactCache:
    """Artifacts on disk, keyed by `artifact_key`.

    Args:
        root: cache directory (created on first export).
        validate: validate every newly exported artifact before it enters the cache.
        exporters: kind -> `export_submodel` override (tests count calls with it).
    """

    def __init__(
        self,
        root: Path,
        *,
        validate: bool = True,
        exporters: Mapping[ArtifactKind, Exporter] | None = None,
    ) -> None:
        self.root = Path(root)
        self.validate = validate
        self._exporters = dict(exporters or {})

    def path_for(self, kind: ArtifactKind, key: str) -> Path:
        """Directory of the entry `key`."""
        return self.root / ArtifactKind(kind).value / key

    def load(self, kind: ArtifactKind, key: str) -> ArtifactManifest | None:
        """The verified manifest of entry `key`, or None when there is no such entry.

        Raises:
            ArtifactError: the entry exists but is corrupt.
        """
        path = self.path_for(kind, key)
        if not path.exists():
            return None
        manifest = load_manifest(path)
        if manifest.key != key or manifest.kind is not ArtifactKind(kind):
            raise ArtifactError(f"cache entry {path} holds artifact {manifest.key[:12]}, not {key[:12]}")
        return manifest

    def get_or_export(
        self,
        model_cfg: ModelConfig,
        widths: Mapping[str, int] | None,
        loss: LossConfig,
        optimizer: str | OptimizerConfig,
        batch_size: int,
        kind: ArtifactKind,
        progress: ProgressCallback | None = None,
    ) -> CachedArtifact:
        """The cached artifact for these settings, exporting (and validating) it on a miss.

        A corrupt entry is logged, removed and exported again. `progress` (msfusion/progress.py)
        hears of the export and the validation as one step each; a cache hit reports nothing.

        Raises:
            ArtifactError: the export or its validation failed.
        """
        kind = ArtifactKind(kind)
        optimizer = OptimizerConfig.of(optimizer)
        key = artifact_key(model_cfg, widths, loss, optimizer, batch_size, kind)
        path = self.path_for(kind, key)
        try:
            manifest = self.load(kind, key)
        except ArtifactError as exc:
            log.warning("cache entry %s is corrupt (%s); exporting it again", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            manifest = None
        if manifest is not None:
            return CachedArtifact(manifest, path, hit=True)

        exporter = self._exporters.get(kind) or default_exporter(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=path.parent))
        try:
            start = time.perf_counter()
            with step(progress, f"export {kind.value} artifact {key[:12]}"):
                manifest = exporter(
                    model_cfg, widths, loss, staging, optimizer=optimizer, batch_size=batch_size, key=key
                )
            export_s = time.perf_counter() - start
            if self.validate:
                from msfusion.export.validate import validate_artifact

                with step(progress, f"validate {kind.value} artifact {key[:12]}"):
                    validate_artifact(staging, model_cfg, widths, loss)
            try:
                staging.rename(path)
            except OSError:
                if not path.exists():
                    raise
                # Another process exported the same key first: keep its entry.
                return CachedArtifact(load_manifest(path), path, hit=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("exported %s artifact %s in %.1f s", kind.value, key[:12], export_s)
        return CachedArtifact(manifest, path, hit=False, export_s=export_s)
