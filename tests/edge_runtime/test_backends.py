"""One contract, checked over every training backend (ONNX Runtime Training, ExecuTorch, torch-native)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from msfusion.edge_runtime.backends.base import TrainingBackend, make_backend
from msfusion.errors import ArtifactError
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.wire.artifacts import ArtifactKind, load_manifest, reference_weights


@pytest.fixture(params=list(ArtifactKind), ids=lambda kind: kind.value)
def kind(request: pytest.FixtureRequest) -> ArtifactKind:
    return ArtifactKind(request.param)


@pytest.fixture
def artifact(kind: ArtifactKind, exported: Callable[..., CachedArtifact]) -> CachedArtifact:
    return exported(kind)


@pytest.fixture
def backend(artifact: CachedArtifact) -> Any:
    loaded = make_backend(artifact.manifest.kind)
    loaded.load(artifact.path, artifact.manifest)
    yield loaded
    loaded.close()


@pytest.fixture
def start(case: Any) -> dict[str, dict[str, np.ndarray]]:
    return {
        "trainable": random_weights(case.model, case.widths, seed=3),
        "previous": random_weights(case.model, case.widths, seed=4),
    }


def _batches(case: Any, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [random_batch(case.model, case.batch, rng) for _ in range(n)]


def _set(backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any]) -> None:
    frozen = reference_weights(artifact.manifest, start["trainable"], start["previous"])
    backend.set_weights(start["trainable"], frozen)


class TestTrainingBackendContract:
    def test_factory_builds_the_kind_asked_for(self, kind: ArtifactKind) -> None:
        assert make_backend(kind.value).kind is kind

    def test_weights_come_back_under_the_spec_names_and_shapes(
        self, backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any]
    ) -> None:
        # Prepare
        _set(backend, artifact, start)
        # Execute
        weights = backend.weights()
        # Assert
        assert sorted(weights) == sorted(start["trainable"])
        for name, value in start["trainable"].items():
            np.testing.assert_array_equal(weights[name], value)
            assert weights[name].dtype == np.float32

    def test_one_step_changes_the_weights_and_reports_a_finite_loss(
        self, backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any], case: Any
    ) -> None:
        # Prepare
        _set(backend, artifact, start)
        ((x, y),) = _batches(case, 1)
        # Execute
        loss = backend.train_step(x, y, lr=0.05)
        after = backend.weights()
        # Assert
        assert np.isfinite(loss) and loss > 0
        changed = [n for n in after if not np.array_equal(after[n], start["trainable"][n])]
        assert sorted(changed) == sorted(start["trainable"])  # every tensor gets a gradient

    def test_set_weights_starts_a_fresh_task(
        self, backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any], case: Any
    ) -> None:
        # Prepare: two identical tasks; momentum from the first must not leak into the second
        batches = _batches(case, 3)
        runs = []
        # Execute
        for _ in range(2):
            _set(backend, artifact, start)
            losses = [backend.train_step(x, y, lr=0.05) for x, y in batches]
            runs.append((losses, backend.weights()))
        # Assert
        np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
        for name in runs[0][1]:
            np.testing.assert_allclose(runs[0][1][name], runs[1][1][name], atol=1e-6)

    def test_each_task_reads_its_own_references(
        self, backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any], case: Any
    ) -> None:
        # Prepare: the same sub-model and batch, the previous-round reference of two rounds
        ((x, y),) = _batches(case, 1)
        rounds = [start["previous"], random_weights(case.model, case.widths, seed=5), start["previous"]]
        losses = []
        # Execute
        for previous in rounds:
            backend.set_weights(start["trainable"], reference_weights(artifact.manifest, start["trainable"], previous))
            losses.append(backend.train_step(x, y, lr=0.05))
        # Assert: the second task's loss is its own, and the first one's comes back with its references
        assert losses[1] != pytest.approx(losses[0], rel=1e-4)
        assert losses[2] == pytest.approx(losses[0], rel=1e-6)

    def test_weights_with_a_wrong_name_or_shape_are_rejected(
        self, backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any]
    ) -> None:
        frozen = reference_weights(artifact.manifest, start["trainable"], start["previous"])
        missing = dict(start["trainable"])
        name = sorted(missing)[0]
        del missing[name]
        with pytest.raises(ArtifactError, match=name):
            backend.set_weights(missing, frozen)
        misshaped = dict(start["trainable"], **{name: np.zeros((1, 2, 3), np.float32)})
        with pytest.raises(ArtifactError, match="shape"):
            backend.set_weights(misshaped, frozen)
        with pytest.raises(ArtifactError, match="frozen"):
            backend.set_weights(start["trainable"], {})

    def test_a_batch_of_another_size_is_rejected(
        self, backend: TrainingBackend, artifact: CachedArtifact, start: dict[str, Any], case: Any
    ) -> None:
        _set(backend, artifact, start)
        ((x, y),) = _batches(case, 1)
        with pytest.raises(ArtifactError, match="batch shapes"):
            backend.train_step(x[:-1], y[:-1], lr=0.05)

    def test_a_corrupt_artifact_is_refused_at_load(self, artifact: CachedArtifact, tmp_path: Path) -> None:
        # Prepare: flip one byte in the middle of the largest file
        copy = tmp_path / "artifact"
        shutil.copytree(artifact.path, copy)
        largest = max(artifact.manifest.files, key=lambda entry: entry.size_bytes)
        data = bytearray((copy / largest.name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / largest.name).write_bytes(bytes(data))
        # Execute / Assert
        with pytest.raises(ArtifactError, match="sha256"):
            load_manifest(copy)
        with pytest.raises(ArtifactError, match=largest.name):
            make_backend(artifact.manifest.kind).load(copy, artifact.manifest)

    def test_an_artifact_of_the_other_kind_is_refused(
        self, kind: ArtifactKind, exported: Callable[..., CachedArtifact]
    ) -> None:
        other = exported(ArtifactKind.ORT if kind is ArtifactKind.EXECUTORCH else ArtifactKind.EXECUTORCH)
        with pytest.raises(ArtifactError, match="cannot train"):
            make_backend(kind).load(other.path, other.manifest)


def test_an_unknown_kind_is_an_artifact_error() -> None:
    with pytest.raises(ArtifactError, match="unknown artifact kind"):
        make_backend("tflite")
