"""Exported training artifacts for the backend tests, shared through an on-disk cache.

tests/export/conftest.py builds the same cache in the same folder, so each
artifact is exported once per session whichever folder asks first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest

from msfusion.coordinator.engine import LossConfig
from msfusion.coordinator.loss import ContrastiveVariant
from msfusion.coordinator.models import ModelConfig, model_spec
from msfusion.coordinator.spec import widths_for_ratio
from msfusion.edge_runtime.artifacts import ArtifactKind, OptimizerConfig
from msfusion.export.cache import ArtifactCache, CachedArtifact


@dataclass(frozen=True)
class Case:
    """The small setting most artifact tests share (a half-width CNN on 16x16 images)."""

    model: ModelConfig = ModelConfig(arch="cnn", channels=(8, 16, 32), image_size=16)
    widths: dict[str, int] = field(default_factory=dict)
    moon: LossConfig = LossConfig(ContrastiveVariant.MOON, mu=0.5, tau=0.5)
    ce_only: LossConfig = LossConfig()
    sgd: OptimizerConfig = OptimizerConfig("sgd", momentum=0.9, weight_decay=0.0)
    batch: int = 8


CASE = Case(widths=widths_for_ratio(model_spec(Case.model), 0.5))


@pytest.fixture(scope="session")
def case() -> Case:
    return CASE


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> ArtifactCache:
    # validate=False: the tests that exercise validation call validate_artifact themselves.
    return ArtifactCache(tmp_path_factory.getbasetemp() / "msfusion-artifacts", validate=False)


@pytest.fixture(scope="session")
def exported(artifact_cache: ArtifactCache) -> Callable[..., CachedArtifact]:
    """`exported(kind, loss=CASE.moon, optimizer=CASE.sgd, model=CASE.model, widths=CASE.widths)`."""

    def get(
        kind: ArtifactKind,
        loss: LossConfig = CASE.moon,
        optimizer: OptimizerConfig = CASE.sgd,
        model: ModelConfig = CASE.model,
        widths: dict[str, int] | None = None,
    ) -> CachedArtifact:
        widths = widths if widths is not None else (CASE.widths if model == CASE.model else None)
        return artifact_cache.get_or_export(model, widths, loss, optimizer, CASE.batch, kind)

    return get
