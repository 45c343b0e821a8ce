"""Artifact manifests, checksums and the transfer blob (no runtime involved)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from msfusion.errors import ArtifactError, ConfigError
from msfusion.wire.artifacts import (
    MANIFEST_NAME,
    ArtifactKind,
    ArtifactManifest,
    OptimizerConfig,
    TensorInfo,
    describe_files,
    load_manifest,
    pack_artifact,
    reference_weights,
    unpack_artifact,
    write_manifest,
)


def _artifact(directory: Path) -> ArtifactManifest:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "program.pte").write_bytes(bytes(range(256)) * 40)
    (directory / "notes.bin").write_bytes(b"\x00\x01" * 7)
    manifest = ArtifactManifest(
        kind=ArtifactKind.EXECUTORCH,
        key="ab" * 32,
        arch="cnn",
        files=describe_files(directory, ["program.pte", "notes.bin"]),
        params=(TensorInfo("fc.weight", (3, 4)), TensorInfo("fc.bias", (3,))),
        frozen=(TensorInfo("global_ref.fc.weight", (3, 4)), TensorInfo("prev_ref.fc.weight", (3, 4))),
        inputs=(TensorInfo("x", (8, 4)), TensorInfo("y", (8,), "int64")),
        optimizer=OptimizerConfig("adamw", weight_decay=0.01),
        loss={"variant": "moon", "mu": 0.1, "tau": 0.5},
        param_prefix="objective.model.",
        versions={"executorch": "1.5.1"},
    )
    write_manifest(directory, manifest)
    return manifest


def test_the_manifest_round_trips_through_json(tmp_path: Path) -> None:
    manifest = _artifact(tmp_path / "a")
    assert ArtifactManifest.from_json(manifest.to_json()) == manifest
    assert load_manifest(tmp_path / "a") == manifest
    assert manifest.batch_size == 8


@pytest.mark.parametrize(
    "text", ["not json", "{}", '{"format_version": 99}', '{"format_version": 1, "kind": "tflite"}']
)
def test_a_malformed_manifest_is_an_artifact_error(text: str) -> None:
    with pytest.raises(ArtifactError):
        ArtifactManifest.from_json(text)


def test_pack_and_unpack_give_back_the_same_files(tmp_path: Path) -> None:
    # Prepare
    manifest = _artifact(tmp_path / "a")
    # Execute
    blob = pack_artifact(tmp_path / "a")
    unpacked = unpack_artifact(blob, tmp_path / "b")
    # Assert
    assert unpacked == manifest
    for entry in manifest.files:
        assert (tmp_path / "b" / entry.name).read_bytes() == (tmp_path / "a" / entry.name).read_bytes()


def test_a_flipped_byte_in_the_blob_is_caught(tmp_path: Path) -> None:
    _artifact(tmp_path / "a")
    blob = bytearray(pack_artifact(tmp_path / "a"))
    at = bytes(blob).index(bytes(range(256))) + 100  # inside program.pte
    blob[at] ^= 0xFF
    with pytest.raises(ArtifactError, match="program.pte.*sha256"):
        unpack_artifact(bytes(blob), tmp_path / "b")


def test_a_truncated_blob_or_garbage_is_caught(tmp_path: Path) -> None:
    _artifact(tmp_path / "a")
    blob = pack_artifact(tmp_path / "a")
    for bad in (blob[: len(blob) // 3], b"garbage" * 100, b""):
        with pytest.raises(ArtifactError):
            unpack_artifact(bad, tmp_path / "b")


def test_a_member_the_manifest_does_not_name_is_refused(tmp_path: Path) -> None:
    # Prepare: a blob with the right manifest plus an extra path-traversing member
    _artifact(tmp_path / "a")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tmp_path / "a" / MANIFEST_NAME, arcname=MANIFEST_NAME)
        tar.add(tmp_path / "a" / "notes.bin", arcname="../notes.bin")
    # Execute / Assert
    with pytest.raises(ArtifactError, match="unexpected member"):
        unpack_artifact(buffer.getvalue(), tmp_path / "b")
    assert not (tmp_path / "notes.bin").exists()


def test_a_missing_or_resized_file_is_caught(tmp_path: Path) -> None:
    _artifact(tmp_path / "a")
    (tmp_path / "a" / "notes.bin").write_bytes(b"\x00")
    with pytest.raises(ArtifactError, match="notes.bin.*bytes"):
        load_manifest(tmp_path / "a")
    (tmp_path / "a" / "notes.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(tmp_path / "a")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_manifest(tmp_path / "nowhere")


def test_reference_weights_pick_the_tensors_the_artifact_reads(tmp_path: Path) -> None:
    manifest = _artifact(tmp_path / "a")
    global_ref = {"fc.weight": np.zeros((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)}
    previous = {"fc.weight": np.ones((3, 4), np.float32), "fc.bias": np.ones(3, np.float32)}
    frozen = reference_weights(manifest, global_ref, previous)
    assert sorted(frozen) == ["global_ref.fc.weight", "prev_ref.fc.weight"]
    assert frozen["global_ref.fc.weight"].sum() == 0 and frozen["prev_ref.fc.weight"].sum() == 12
    assert reference_weights(manifest, global_ref)["prev_ref.fc.weight"].sum() == 0  # no previous: global
    with pytest.raises(ArtifactError, match="fc.weight"):
        reference_weights(manifest, {"fc.bias": global_ref["fc.bias"]})


@pytest.mark.parametrize(
    "kwargs", [{"name": "lamb"}, {"momentum": 1.0}, {"weight_decay": -1.0}, {"betas": (0.9, 1.0)}, {"eps": 0.0}]
)
def test_optimizer_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        OptimizerConfig(**kwargs)  # type: ignore[arg-type]
