"""The artifact cache: one export per graph-shaping key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import pytest

from msfusion.errors import ArtifactError
from msfusion.export.cache import ArtifactCache, artifact_key
from msfusion.export.versions import runtime_versions
from msfusion.models.config import ContrastiveVariant, LossConfig
from msfusion.models.registry import model_spec
from msfusion.wire.artifacts import (
    ArtifactKind,
    ArtifactManifest,
    OptimizerConfig,
    TensorInfo,
    describe_files,
    load_manifest,
    pack_artifact,
    unpack_artifact,
    write_manifest,
)


class CountingExporter:
    """Writes a one-file artifact and counts its calls (stands in for a minutes-long export)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self,
        model_cfg: Any,
        widths: Any,
        loss: LossConfig,
        out_dir: Path,
        *,
        optimizer: OptimizerConfig,
        batch_size: int,
        key: str,
    ) -> ArtifactManifest:
        self.calls += 1
        (out_dir / "program.pte").write_bytes(b"graph %d" % self.calls)
        manifest = ArtifactManifest(
            kind=ArtifactKind.EXECUTORCH,
            key=key,
            arch=model_cfg.arch,
            files=describe_files(out_dir, ["program.pte"]),
            params=(),
            frozen=(),
            inputs=(TensorInfo("x", (batch_size, 1)), TensorInfo("y", (batch_size,), "int64")),
            optimizer=optimizer,
            loss={"variant": loss.variant.value},
        )
        write_manifest(out_dir, manifest)
        return manifest


def _key(case: Any, **changes: Any) -> str:
    args: Mapping[str, Any] = {
        "model_cfg": case.model,
        "widths": case.widths,
        "loss": case.moon,
        "optimizer": "sgd",
        "batch_size": 8,
        "kind": ArtifactKind.ORT,
        "versions": None,
    }
    return artifact_key(**{**args, **changes})


def test_the_key_changes_with_everything_that_shapes_the_graph(case: Any) -> None:
    base = _key(case)
    assert base == _key(case) and len(base) == 64
    variants = [
        _key(case, model_cfg=replace(case.model, num_classes=7)),
        _key(case, widths={**case.widths, "conv0": 3}),
        _key(case, loss=case.ce_only),
        _key(case, loss=replace(case.moon, mu=0.25)),
        _key(case, loss=replace(case.moon, tau=0.1)),
        _key(case, loss=replace(case.moon, variant=ContrastiveVariant.POSITIVE)),
        _key(case, optimizer="adamw"),
        _key(case, optimizer=OptimizerConfig("sgd", momentum=0.5)),
        _key(case, batch_size=16),
        _key(case, kind=ArtifactKind.EXECUTORCH),
        _key(case, kind=ArtifactKind.TORCH),
        _key(case, kind=ArtifactKind.TORCH, versions={**runtime_versions(ArtifactKind.TORCH), "torch": "2.99"}),
        _key(case, versions={**runtime_versions(ArtifactKind.ORT), "onnx": "1.18.0"}),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_equivalent_settings_share_one_key(case: Any) -> None:
    off = _key(case, loss=LossConfig(ContrastiveVariant.OFF))
    assert off == _key(case, loss=LossConfig(ContrastiveVariant.MOON, mu=0.0))
    assert off == _key(case, loss=LossConfig(ContrastiveVariant.OFF, mu=0.7, tau=0.2))
    assert _key(case, widths=None) == _key(case, widths=model_spec(case.model).group_sizes)  # None = full width


def test_a_miss_exports_once_and_a_hit_exports_nothing(tmp_path: Path, case: Any) -> None:
    # Prepare
    exporter = CountingExporter()
    cache = ArtifactCache(tmp_path, validate=False, exporters={ArtifactKind.EXECUTORCH: exporter})
    args = (case.model, case.widths, case.moon, "sgd", 8, ArtifactKind.EXECUTORCH)
    # Execute
    first = cache.get_or_export(*args)
    second = cache.get_or_export(*args)
    other = cache.get_or_export(case.model, case.widths, case.moon, "sgd", 16, ArtifactKind.EXECUTORCH)
    # Assert
    assert (first.hit, second.hit, other.hit) == (False, True, False)
    assert exporter.calls == 2
    assert second.manifest == first.manifest and second.path == first.path
    assert first.path == tmp_path / "executorch" / first.manifest.key
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def test_a_corrupt_entry_raises_on_load_and_is_exported_again(tmp_path: Path, case: Any) -> None:
    exporter = CountingExporter()
    cache = ArtifactCache(tmp_path, validate=False, exporters={ArtifactKind.EXECUTORCH: exporter})
    args = (case.model, case.widths, case.moon, "sgd", 8, ArtifactKind.EXECUTORCH)
    entry = cache.get_or_export(*args)
    (entry.path / "program.pte").write_bytes(b"graph 9")  # same size, other bytes
    with pytest.raises(ArtifactError, match="sha256"):
        cache.load(ArtifactKind.EXECUTORCH, entry.manifest.key)
    again = cache.get_or_export(*args)
    assert not again.hit and exporter.calls == 2
    assert load_manifest(again.path) == again.manifest


@pytest.mark.parametrize("kind", [ArtifactKind.ORT, ArtifactKind.TORCH], ids=lambda kind: kind.value)
def test_a_real_export_is_validated_cached_and_packed(kind: ArtifactKind, tmp_path: Path, case: Any) -> None:
    # Prepare
    cache = ArtifactCache(tmp_path / "cache", validate=True)
    args = (case.model, case.widths, case.moon, case.sgd, case.batch, kind)
    # Execute
    first = cache.get_or_export(*args)
    second = cache.get_or_export(*args)
    unpacked = unpack_artifact(pack_artifact(second.path), tmp_path / "device")
    # Assert
    assert not first.hit and second.hit and first.export_s > 0
    assert first.path == tmp_path / "cache" / kind.value / first.manifest.key
    assert unpacked == first.manifest
    assert [p.name for p in first.manifest.params] and all("." in p.name for p in first.manifest.frozen)
    assert not any(p.name.startswith("model.") for p in first.manifest.params)  # plain spec names
