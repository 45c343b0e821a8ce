"""validate_artifact passes sound artifacts and names what is wrong with broken ones."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.training import artifacts

from msfusion.edge_runtime.backends.ort import TRAINING_MODEL
from msfusion.errors import ArtifactError
from msfusion.export.cache import CachedArtifact
from msfusion.export.onnx_training import _explain_generate_error
from msfusion.export.validate import validate_artifact
from msfusion.wire.artifacts import (
    ArtifactKind,
    describe_files,
    load_manifest,
    write_manifest,
)


@pytest.fixture
def ort_copy(tmp_path: Path, exported: Callable[..., CachedArtifact]) -> Path:
    """A private copy of the small CNN's ORT artifact, free to break."""
    copy = tmp_path / "artifact"
    shutil.copytree(exported(ArtifactKind.ORT).path, copy)
    return copy


def _rewrite_training_model(directory: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Edit the training graph and re-seal the manifest, so only the runtime can object."""
    model = onnx.load(directory / TRAINING_MODEL)
    edit(model)
    onnx.save(model, directory / TRAINING_MODEL)
    manifest = load_manifest(directory, verify=False)
    write_manifest(directory, replace(manifest, files=describe_files(directory, [f.name for f in manifest.files])))


@pytest.mark.parametrize("kind", list(ArtifactKind), ids=lambda kind: kind.value)
def test_a_sound_artifact_passes(kind: ArtifactKind, case: Any, exported: Callable[..., CachedArtifact]) -> None:
    report = validate_artifact(exported(kind).path, case.model, case.widths, case.moon, steps=2)
    assert len(report.losses) == 2 and report.max_weight_error < 1e-4
    np.testing.assert_allclose(report.losses, report.reference_losses, rtol=1e-4)


def test_a_newer_ir_version_is_named_with_the_onnx_to_use(ort_copy: Path, case: Any) -> None:
    def bump(model: onnx.ModelProto) -> None:
        model.ir_version = 11

    _rewrite_training_model(ort_copy, bump)
    with pytest.raises(ArtifactError, match=r"IR version 11.*onnx==1\.17\.0"):
        validate_artifact(ort_copy, case.model, case.widths, case.moon)


def test_a_truncated_graph_is_named(ort_copy: Path, case: Any) -> None:
    path = ort_copy / TRAINING_MODEL
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    manifest = load_manifest(ort_copy, verify=False)
    write_manifest(ort_copy, replace(manifest, files=describe_files(ort_copy, [f.name for f in manifest.files])))
    with pytest.raises(ArtifactError, match="not a readable ONNX protobuf"):
        validate_artifact(ort_copy, case.model, case.widths, case.moon)


def test_a_file_changed_behind_the_manifest_fails_its_checksum(ort_copy: Path, case: Any) -> None:
    with open(ort_copy / TRAINING_MODEL, "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ArtifactError, match=f"{TRAINING_MODEL}.*(bytes|sha256)"):
        validate_artifact(ort_copy, case.model, case.widths, case.moon)


def test_a_wrong_update_is_caught_and_the_tensor_named(ort_copy: Path, case: Any) -> None:
    # The graph still loads and runs, but its SGD momentum is 0.5 instead of 0.9.
    def weaken(model: onnx.ModelProto) -> None:
        for index, init in enumerate(model.graph.initializer):
            if init.name == "msfusion.sgd.momentum":
                model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.array(0.5, np.float32), init.name))

    _rewrite_training_model(ort_copy, weaken)
    with pytest.raises(ArtifactError, match=r"after 3 step\(s\) tensor '[\w.]+' differs"):
        validate_artifact(ort_copy, case.model, case.widths, case.moon, steps=3)


def test_a_missing_gradient_op_is_named(tmp_path: Path) -> None:
    # Prepare: a graph whose loss runs through ReduceMax, which ORT 1.19 cannot differentiate
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("ReduceMax", ["h"], ["loss"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    # Execute
    with pytest.raises(RuntimeError) as raised:
        artifacts.generate_artifacts(model, requires_grad=["w"], artifact_directory=tmp_path)
    # Assert
    assert "op ReduceMax" in str(_explain_generate_error(raised.value))


def _compare_weights(gaps: dict[str, np.ndarray], outlier_bound: float) -> Any:
    from msfusion.export.validate import Tolerance, compare

    want = {name: np.zeros_like(gap) for name, gap in gaps.items()}
    return compare([1.0], gaps, [1.0], want, Tolerance(), "artifact", outlier_bound=outlier_bound)


def test_sgd_allows_no_weight_beyond_the_tolerance() -> None:
    gaps = {"w": np.zeros(1_000_000, np.float32)}
    gaps["w"][7] = 2e-4
    with pytest.raises(ArtifactError, match=r"'w' differs .* by 0.0002"):
        _compare_weights(gaps, outlier_bound=0.0)


def test_adamw_allows_a_few_rounding_outliers_within_its_step_bound() -> None:
    """AdamW's per-element normalization turns rounding noise near zero gradients into steps up to lr."""
    gaps = {"w": np.zeros(1_000_000, np.float32)}
    gaps["w"][[3, 500_000]] = 1.6e-4  # 2 of 1M: under the 1e-5 share
    report = _compare_weights(gaps, outlier_bound=2.1e-3)
    assert report.max_weight_error == pytest.approx(1.6e-4)


@pytest.mark.parametrize(
    ("outliers", "size", "why"),
    [
        (50, 1.5e-4, r"50 elements beyond it \(allowed 10, per tensor\)"),  # too many: a wrong gradient
        (1, 5e-3, r"by 0.005"),  # one, but further than AdamW can move a weight in one step
        (1, np.nan, r"by inf"),  # a NaN never passes
    ],
)
def test_adamw_outliers_beyond_the_share_or_the_bound_fail(outliers: int, size: float, why: str) -> None:
    gaps = {"w": np.zeros(1_000_000, np.float32)}
    gaps["w"][:outliers] = size
    with pytest.raises(ArtifactError, match=why):
        _compare_weights(gaps, outlier_bound=2.1e-3)


def test_adamw_allows_one_rounding_outlier_in_a_small_tensor() -> None:
    """As XNNPACK's products left the char-LM at width 1/2: one of fc_in.bias's 256 elements 1.4e-4 off."""
    gaps = {"w": np.zeros(65_536, np.float32), "fc_in.bias": np.zeros(256, np.float32)}
    gaps["fc_in.bias"][17] = 1.36e-4
    assert _compare_weights(gaps, outlier_bound=2.1e-3).worst_tensor == "fc_in.bias"
    gaps["fc_in.bias"][18] = 1.36e-4  # two of 256: more than rounding (the 2 allowed: one per tensor)
    with pytest.raises(ArtifactError, match=r"2 elements beyond it \(allowed 2, per tensor\)"):
        _compare_weights(gaps, outlier_bound=2.1e-3)


def test_adamw_gives_a_small_tensor_no_share_of_a_large_models_allowance() -> None:
    """A wrong bias gradient (81 elements) must not hide in the allowance of millions of other elements."""
    gaps = {"w": np.zeros(13_000_000, np.float32), "head.bias": np.full(81, 2e-3, np.float32)}
    with pytest.raises(ArtifactError, match=r"'head.bias' differs"):
        _compare_weights(gaps, outlier_bound=2.1e-3)
