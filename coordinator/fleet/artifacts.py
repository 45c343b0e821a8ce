"""Training artifacts for the fleet: export each sub-model shape once (export/cache.py), ship it as one blob.

A device caches what it unpacked by the blob's sha256, so after the first
round of a shape only weights travel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.edge_runtime.profiling import (
    ProfileSet,
    ProfileSetPoint,
    load_profile_set,
    write_profile_set_index,
)
from msfusion.errors import ConfigError
from msfusion.export.cache import ArtifactCache
from msfusion.models.registry import model_spec
from msfusion.progress import ProgressCallback
from msfusion.recipe import EngineConfig
from msfusion.wire.artifacts import ArtifactKind, pack_artifact
from msfusion.wire.bulk import make_manifest
from msfusion.wire.protocol import BulkRef

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "msfusion" / "artifacts"


class ExportedArtifacts:
    """An `ArtifactSource` over the on-disk export cache, keeping each shape's packed blob in memory.

    Args:
        engine: model, loss and local-training knobs (they shape the graph).
        backend: artifact kind.
        cache_dir: the export cache (None: ~/.cache/msfusion/artifacts).
        progress: hears of each export and validation (msfusion/progress.py; the CLI draws bars).
    """

    def __init__(
        self,
        engine: EngineConfig,
        backend: str,
        cache_dir: Path | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.engine = engine
        self.kind = ArtifactKind(backend)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        self.progress = progress
        self._cache = ArtifactCache(self.cache_dir)
        self._blobs: dict[tuple[ArtifactKind, tuple[tuple[str, int], ...]], tuple[BulkRef, bytes]] = {}

    def get(self, widths: Mapping[str, int], kind: str = "") -> tuple[BulkRef, bytes]:
        """The packed artifact of `kind` ("": `backend`) for `widths` and its transfer manifest (named by its sha256).

        Raises:
            ArtifactError: the export or its validation failed.
        """
        artifact_kind = ArtifactKind(kind) if kind else self.kind
        shape = (artifact_kind, tuple(sorted(widths.items())))
        if shape not in self._blobs:
            cached = self._cache.get_or_export(
                self.engine.model,
                widths,
                self.engine.loss,
                self.engine.local.optimizer,
                self.engine.local.batch_size,
                artifact_kind,
                progress=self.progress,
            )
            log.info(
                "%s artifact for %s: %s (%s)",
                artifact_kind.value,
                dict(widths),
                cached.manifest.key[:12],
                "cached" if cached.hit else "exported",
            )
            data = pack_artifact(cached.path)
            manifest = make_manifest("a-placeholder", "artifact", data)
            # Named by content: a device that holds this sha256 never asks for it again.
            manifest = make_manifest(f"a-{manifest.sha256[:40]}", "artifact", data)
            self._blobs[shape] = (manifest, data)
        return self._blobs[shape]


def profile_key(engine: EngineConfig) -> str:
    """Names what a device profile measures: the model, loss and optimizer (not the widths, batch or backend).

    A coordinator sizes a device from its profile only when the keys agree. The
    artifact kind is not part of it: one profile holds the points of every
    backend the board runs, each entry naming its own (`ProfileEntry.backend`).
    """
    from msfusion.export.objective import loss_signature

    payload = {
        "model": dataclasses.asdict(engine.model),
        "loss": loss_signature(engine.loss),
        "optimizer": dataclasses.asdict(engine.local.optimizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:32]


def export_profile_set(
    engine: EngineConfig,
    backend: str,
    widths: Sequence[float],
    batch_sizes: Sequence[int],
    out_dir: Path,
    cache_dir: Path | None = None,
    validate: bool = True,
    progress: ProgressCallback | None = None,
) -> ProfileSet:
    """The artifacts a device profiles (`msfusion-device profile --artifacts out_dir`), one per width x batch size.

    Args:
        engine: model, loss and optimizer of the run the devices will train.
        backend: artifact kind.
        widths: width ratios in (0, 1].
        batch_sizes: batch sizes.
        out_dir: the folder to write (artifacts are copied out of the export cache).
        cache_dir: the export cache (None: the default).
        validate: validate each new export against torch (export/validate.py).
        progress: hears of the set as a whole (one step per artifact) and of each export and
            validation (msfusion/progress.py).

    Returns:
        The profile set.

    Raises:
        ConfigError: a bad width or batch size.
        ArtifactError: an export failed.
    """
    if not widths or not batch_sizes or any(not 0.0 < w <= 1.0 for w in widths) or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"profile widths must be in (0, 1] and batch sizes >= 1, got {widths}, {batch_sizes}")
    cache = ArtifactCache(Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE, validate=validate)
    spec = model_spec(engine.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = []
    grid = [(ratio, batch) for ratio in sorted(set(widths), reverse=True) for batch in sorted(set(batch_sizes))]
    overall = f"profile set {out_dir}"
    if progress is not None:
        progress(overall, 0, len(grid))
    for ratio, batch in grid:
        cached = cache.get_or_export(
            engine.model,
            widths_for_ratio(spec, ratio),
            engine.loss,
            engine.local.optimizer,
            batch,
            ArtifactKind(backend),
            progress=progress,
        )
        name = f"w{ratio:g}-b{batch}"
        shutil.rmtree(out_dir / name, ignore_errors=True)
        shutil.copytree(cached.path, out_dir / name)
        points.append(ProfileSetPoint(ratio, batch, name))
        if progress is not None:
            progress(overall, len(points), len(grid))
    write_profile_set_index(out_dir, profile_key(engine), ArtifactKind(backend).value, points)
    return load_profile_set(out_dir)
