"""train_local on a real backend reproduces the reference engine's local training."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from msfusion.coordinator.reference.engine import local_train
from msfusion.data.datasets import ArrayDataset
from msfusion.edge_runtime.backends.base import make_backend
from msfusion.edge_runtime.trainer import train_local
from msfusion.errors import ConfigError
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.recipe import LocalTrainConfig
from msfusion.wire.artifacts import ArtifactKind, reference_weights


@pytest.fixture
def shard(case: Any) -> ArrayDataset:
    x, y = random_batch(case.model, 50, np.random.default_rng(1))
    return ArrayDataset(x, y)


def test_train_local_matches_the_reference_engine(
    case: Any, exported: Callable[..., CachedArtifact], shard: ArrayDataset
) -> None:
    # Prepare
    artifact = exported(ArtifactKind.ORT)
    start = random_weights(case.model, case.widths, seed=2)
    previous = random_weights(case.model, case.widths, seed=3)
    config = LocalTrainConfig(epochs=2, batch_size=case.batch, lr=0.05, max_samples=40)
    backend = make_backend(ArtifactKind.ORT)
    backend.load(artifact.path, artifact.manifest)
    # Execute
    result = train_local(
        backend,
        start,
        reference_weights(artifact.manifest, start, previous),
        shard.x,
        shard.y,
        epochs=2,
        batch_size=case.batch,
        lr=0.05,
        seed=7,
        max_samples=40,
    )
    expected = local_train(case.model, case.widths, start, previous, shard, config, case.moon, seed=7)
    # Assert
    assert result.n_samples == expected.n_samples == 40
    assert len(result.loss_curve) == 2 * 40 // case.batch
    np.testing.assert_allclose(result.loss_curve, expected.loss_curve, rtol=1e-4)
    for name, value in expected.weights.items():
        np.testing.assert_allclose(result.weights[name], value, atol=1e-4, err_msg=name)
    assert result.step_time_s > 0 and result.wall_s >= result.step_time_s * len(result.loss_curve)
    assert result.peak_rss_bytes >= result.memory.baseline_rss_bytes > 0


def test_train_local_refuses_a_shard_smaller_than_one_batch(case: Any, exported: Callable[..., CachedArtifact]) -> None:
    artifact = exported(ArtifactKind.ORT)
    backend = make_backend(ArtifactKind.ORT)
    backend.load(artifact.path, artifact.manifest)
    start = random_weights(case.model, case.widths, seed=2)
    x, y = random_batch(case.model, case.batch - 1, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        train_local(
            backend,
            start,
            reference_weights(artifact.manifest, start),
            x,
            y,
            epochs=1,
            batch_size=case.batch,
            lr=0.05,
            seed=0,
        )
    with pytest.raises(ConfigError, match="lr_schedule"):
        train_local(
            backend,
            start,
            reference_weights(artifact.manifest, start),
            x,
            y,
            epochs=1,
            batch_size=case.batch,
            lr=0.05,
            seed=0,
            lr_schedule="cosine",
        )


def test_release_weights_frees_the_callers_arrays_and_trains_the_same(
    case: Any, exported: Callable[..., CachedArtifact], shard: ArrayDataset
) -> None:
    """With release_weights, the received weights are freed once ORT holds its copies."""
    import gc
    import weakref

    artifact = exported(ArtifactKind.ORT)
    start = random_weights(case.model, case.widths, seed=2)
    previous = random_weights(case.model, case.widths, seed=3)
    runs = []
    for release in (False, True):
        trainable = {name: value.copy() for name, value in start.items()}
        frozen = reference_weights(artifact.manifest, trainable, {n: v.copy() for n, v in previous.items()})
        alive = [weakref.ref(value) for value in (*trainable.values(), *frozen.values())]
        backend = make_backend(ArtifactKind.ORT)
        backend.load(artifact.path, artifact.manifest)
        runs.append(
            train_local(
                backend,
                trainable,
                frozen,
                shard.x,
                shard.y,
                epochs=1,
                batch_size=case.batch,
                lr=0.05,
                seed=7,
                release_weights=release,
            )
        )
        gc.collect()
        # Without release the caller's dicts still hold every array; with it none survives.
        assert (trainable == {} and frozen == {}) is release
        assert sum(ref() is not None for ref in alive) == (0 if release else len(alive))
        del trainable, frozen
        backend.close()
    assert runs[0].loss_curve == runs[1].loss_curve
    for name, value in runs[0].weights.items():
        np.testing.assert_array_equal(runs[1].weights[name], value)
