"""Training artifacts for the fleet: export each sub-model shape once (export/cache.py), ship it as one blob.

A device caches what it unpacked by the blob's sha256, so after the first
round of a shape only weights travel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from msfusion.coordinator.engine import EngineConfig
from msfusion.edge_runtime.artifacts import ArtifactKind, OptimizerConfig, pack_artifact
from msfusion.edge_runtime.bulk import make_manifest
from msfusion.edge_runtime.protocol import BulkRef
from msfusion.export.cache import ArtifactCache

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "msfusion" / "artifacts"


def optimizer_of(engine: EngineConfig) -> OptimizerConfig:
    """The optimizer an artifact must implement to train as the reference engine does."""
    local = engine.local
    return OptimizerConfig(name=local.optimizer, momentum=local.momentum if local.optimizer == "sgd" else 0.0,
                           weight_decay=local.weight_decay)  # fmt: skip


class ExportedArtifacts:
    """An `ArtifactSource` over the on-disk export cache, keeping each shape's packed blob in memory.

    Args:
        engine: model, loss and local-training knobs (they shape the graph).
        backend: artifact kind.
        cache_dir: the export cache (None: ~/.cache/msfusion/artifacts).
    """

    def __init__(self, engine: EngineConfig, backend: str, cache_dir: Path | None = None) -> None:
        self.engine = engine
        self.kind = ArtifactKind(backend)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
        self._cache = ArtifactCache(self.cache_dir)
        self._blobs: dict[tuple[tuple[str, int], ...], tuple[BulkRef, bytes]] = {}

    def get(self, widths: Mapping[str, int]) -> tuple[BulkRef, bytes]:
        """The packed artifact for `widths` and its transfer manifest (named by its sha256).

        Raises:
            ArtifactError: the export or its validation failed.
        """
        shape = tuple(sorted(widths.items()))
        if shape not in self._blobs:
            cached = self._cache.get_or_export(
                self.engine.model, widths, self.engine.loss, optimizer_of(self.engine),
                self.engine.local.batch_size, self.kind,
            )  # fmt: skip
            log.info("artifact for %s: %s (%s)", dict(widths), cached.manifest.key[:12], "cached" if cached.hit else "exported")
            data = pack_artifact(cached.path)
            manifest = make_manifest("a-placeholder", "artifact", data)
            # Named by content: a device that holds this sha256 never asks for it again.
            manifest = make_manifest(f"a-{manifest.sha256[:40]}", "artifact", data)
            self._blobs[shape] = (manifest, data)
        return self._blobs[shape]
