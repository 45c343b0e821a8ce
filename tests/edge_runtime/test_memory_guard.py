"""The memory guard: a training run that passes its budget stops between steps with the numbers, and frees its memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import numpy.typing as npt
import pytest

from msfusion.coordinator.fleet.rounds import tensor_axes
from msfusion.data.shards import write_shard
from msfusion.edge_runtime.backends.base import TrainingBackend, make_backend
from msfusion.edge_runtime.config import DeviceConfig
from msfusion.edge_runtime.memory import (
    MemorySampler,
    current_rss_bytes,
    release_memory,
)
from msfusion.edge_runtime.trainer import train_local, train_task
from msfusion.errors import MemoryBudgetExceeded
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.models.registry import model_spec
from msfusion.wire.artifacts import ArtifactKind, pack_artifact, reference_weights
from msfusion.wire.bulk import make_manifest
from msfusion.wire.protocol import (
    BulkRef,
    SliceResult,
    TaskFailed,
    TrainTask,
    decode,
    encode,
    failure_code,
)
from msfusion.wire.weights import pack_weights

MIB = 1 << 20
SPIKE_BYTES = 160 * MIB


class SpikingBackend:
    """A real backend whose step `spike_at` also touches `SPIKE_BYTES` for a moment (then frees them)."""

    def __init__(self, backend: TrainingBackend, spike_at: int) -> None:
        self._backend = backend
        self._spike_at = spike_at
        self._steps = 0
        self.kind = backend.kind

    def load(self, artifact_dir: Any, manifest: Any) -> None:
        self._backend.load(artifact_dir, manifest)

    def set_weights(self, trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> None:
        self._backend.set_weights(trainable, frozen)

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        self._steps += 1
        if self._steps == self._spike_at:
            np.ones(SPIKE_BYTES // 8)  # touched, then freed at once: shorter than most sampling intervals
        return self._backend.train_step(x, y, lr)

    def weights(self) -> dict[str, npt.NDArray[np.float32]]:
        return self._backend.weights()

    def close(self) -> None:
        self._backend.close()


def _loaded(exported: Callable[..., CachedArtifact]) -> tuple[TrainingBackend, CachedArtifact]:
    artifact = exported(ArtifactKind.ORT)
    backend = make_backend(ArtifactKind.ORT)
    backend.load(artifact.path, artifact.manifest)
    return backend, artifact


def test_the_guard_stops_at_the_step_boundary_after_the_peak_passed_the_budget(
    case: Any, exported: Callable[..., CachedArtifact]
) -> None:
    # Prepare: a budget well above the run's own needs, below its needs plus the spike of step 3
    backend, artifact = _loaded(exported)
    start = random_weights(case.model, case.widths, seed=2)
    x, y = random_batch(case.model, 6 * case.batch, np.random.default_rng(0))
    budget = current_rss_bytes() + SPIKE_BYTES // 2
    steps: list[float] = []
    # Execute
    with pytest.raises(MemoryBudgetExceeded) as caught:
        train_local(
            SpikingBackend(backend, spike_at=3),
            start,
            reference_weights(artifact.manifest, start),
            x,
            y,
            epochs=1,
            batch_size=case.batch,
            lr=0.05,
            seed=0,
            progress=steps.append,
            memory_budget_bytes=budget,
        )
    backend.close()
    # Assert: stopped right after step 3 of 6, with the numbers
    assert len(steps) == 2
    assert "stopped after step 3 of 6" in str(caught.value)
    assert caught.value.budget_bytes == budget
    assert caught.value.peak_bytes > budget + SPIKE_BYTES // 4
    failed_code = failure_code(caught.value)
    assert failed_code == "memory_budget"


def test_without_a_budget_or_under_it_the_run_completes(case: Any, exported: Callable[..., CachedArtifact]) -> None:
    backend, artifact = _loaded(exported)
    start = random_weights(case.model, case.widths, seed=2)
    x, y = random_batch(case.model, 3 * case.batch, np.random.default_rng(0))
    generous = current_rss_bytes() + 2 * SPIKE_BYTES
    result = train_local(
        SpikingBackend(backend, spike_at=2),
        start,
        reference_weights(artifact.manifest, start),
        x,
        y,
        epochs=1,
        batch_size=case.batch,
        lr=0.05,
        seed=0,
        memory_budget_bytes=generous,
    )
    backend.close()
    assert len(result.loss_curve) == 3
    assert 0.9 * SPIKE_BYTES <= result.peak_rss_bytes - result.memory.baseline_rss_bytes < 2 * SPIKE_BYTES


def test_the_live_peak_includes_the_kernels_high_water_mark() -> None:
    with MemorySampler(interval_s=10.0) as sampler:  # the thread never samples: only VmHWM can see the spike
        before = sampler.peak_bytes()
        np.ones(SPIKE_BYTES // 8)
        during = sampler.peak_bytes()
    if not sampler.report or not sampler.report.hwm_reset:
        pytest.skip("this kernel does not let a process reset its VmHWM")
    assert during >= before + SPIKE_BYTES * 0.9


def test_release_memory_hands_freed_heap_back() -> None:
    # Prepare: 190 MiB of 64 KiB blocks interleaved with small survivors, so the heap cannot shrink by itself
    blocks = [bytearray(64 << 10) for _ in range(3000)]
    survivors = [bytearray(2048) for _ in range(3000)]
    held = current_rss_bytes()
    del blocks
    # Execute
    after = release_memory()
    # Assert
    assert held - after > 100 * MIB
    assert len(survivors) == 3000


class BlobIO:
    """The task's transfers, already received (the daemon receives them over MQTT)."""

    def __init__(self, blobs: Mapping[str, bytes]) -> None:
        self.blobs = dict(blobs)

    def fetch(self, manifest: BulkRef, pull: bool) -> bytes:
        return self.blobs[manifest.transfer_id]


@pytest.mark.parametrize("budget", ["half the runtime", "plenty"])
def test_a_task_over_its_budget_gets_one_memory_budget_reply_with_the_numbers(
    case: Any, exported: Callable[..., CachedArtifact], tmp_path: Path, budget: str
) -> None:
    # Prepare: a task for the case's sub-model, its transfers, a shard
    artifact = exported(ArtifactKind.ORT)
    spec = model_spec(case.model)
    blob, weights = pack_artifact(artifact.path), pack_weights(random_weights(case.model, case.widths, seed=2))
    artifact_ref, weights_ref = make_manifest("a-1", "artifact", blob), make_manifest("w-1", "weights", weights)
    x, y = random_batch(case.model, 4 * case.batch, np.random.default_rng(0))
    write_shard(tmp_path / "shard", x, y, {"name": "guard", "task": "classification"})
    task = TrainTask(
        run_id="r",
        round_idx=0,
        device_id="d",
        task_id="t0",
        backend="ort",
        artifact=artifact_ref,
        weights=weights_ref,
        units={g: list(range(w)) for g, w in case.widths.items()},
        tensor_axes=tensor_axes(spec),
        local_epochs=1,
        batch_size=case.batch,
        lr=0.05,
        max_samples=0,
        mu=0.5,
        tau=0.5,
        contrastive="moon",
        optimizer="sgd",
        seed=1,
        deadline_s=120.0,
    )
    limit = current_rss_bytes() // 2 if budget == "half the runtime" else current_rss_bytes() + (1 << 30)
    config = DeviceConfig(
        device_id="d", run_id="r", data_dir=tmp_path / "shard", state_dir=tmp_path / "state", memory_budget_bytes=limit
    )
    # Execute
    outcome = train_task(task, BlobIO({"a-1": blob, "w-1": weights}), None, config)
    # Assert
    if budget == "plenty":
        assert isinstance(outcome.reply, SliceResult) and outcome.reply.peak_rss_bytes <= limit
        return
    reply = outcome.reply
    assert isinstance(reply, TaskFailed) and outcome.slice_bytes is None
    assert reply.code == "memory_budget" and "loading the artifact" in reply.reason
    assert reply.details["budget_bytes"] == limit and int(reply.details["peak_bytes"]) > limit
    assert decode(encode(reply)) == reply
