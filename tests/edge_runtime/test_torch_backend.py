"""The torch-native backend beyond the shared contract: where it trains (CPU, or a CUDA GPU) and its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from msfusion.edge_runtime.backends.base import MeasuresAccelerator, backend_device, make_backend
from msfusion.edge_runtime.config import DeviceConfig
from msfusion.errors import ArtifactError, ConfigError
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.wire.artifacts import ArtifactKind, reference_weights

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(kind_device: str, artifact: CachedArtifact, case: Any, steps: int = 3) -> tuple[list[float], Any, int]:
    trainable = random_weights(case.model, case.widths, seed=3)
    frozen = reference_weights(artifact.manifest, trainable, random_weights(case.model, case.widths, seed=4))
    rng = np.random.default_rng(0)
    backend = make_backend(ArtifactKind.TORCH, device=kind_device)
    try:
        backend.load(artifact.path, artifact.manifest)
        backend.set_weights(trainable, frozen)
        losses = [backend.train_step(*random_batch(case.model, case.batch, rng), lr=0.05) for _ in range(steps)]
        assert isinstance(backend, MeasuresAccelerator)
        return losses, backend.weights(), backend.peak_accelerator_bytes()
    finally:
        backend.close()


@needs_no_gpu
def test_cuda_without_a_gpu_is_refused_with_the_reason() -> None:
    with pytest.raises(ArtifactError, match="sees no CUDA GPU.*device = 'cpu'"):
        make_backend(ArtifactKind.TORCH, device="cuda")


def test_the_cpu_only_backends_refuse_cuda_and_no_backend_takes_an_unknown_device() -> None:
    for kind in (ArtifactKind.ORT, ArtifactKind.EXECUTORCH):
        with pytest.raises(ArtifactError, match="CPU only"):
            make_backend(kind, device="cuda")
    with pytest.raises(ArtifactError, match="cpu or cuda"):
        make_backend(ArtifactKind.TORCH, device="tpu")


def test_only_the_torch_backend_follows_the_boards_device() -> None:
    assert backend_device("torch", "cuda") == "cuda"
    assert backend_device("ort", "cuda") == "cpu" and backend_device("executorch", "cuda") == "cpu"


def test_device_toml_accepts_cuda_only_with_the_torch_backend(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "device_id": "dev000",
        "run_id": "run",
        "state_dir": tmp_path,
        "memory_budget_bytes": 1 << 30,
        "data_dir": tmp_path,
    }
    assert DeviceConfig(**base, backends=("torch",), device="cuda").device == "cuda"
    with pytest.raises(ConfigError, match="add 'torch' to backends"):
        DeviceConfig(**base, backends=("ort",), device="cuda")
    with pytest.raises(ConfigError, match="'cpu' or 'cuda'"):
        DeviceConfig(**base, backends=("torch",), device="gpu")
    with pytest.raises(ConfigError, match="pins a backend this device lacks"):
        DeviceConfig(**base, backends=("ort",), backend="torch")


def test_on_the_cpu_it_reports_no_accelerator_memory(case: Any, exported: Callable[..., CachedArtifact]) -> None:
    losses, _, peak = _train("cpu", exported(ArtifactKind.TORCH), case)
    assert all(np.isfinite(losses)) and peak == 0


@needs_gpu
def test_on_a_gpu_it_trains_as_on_the_cpu_and_measures_gpu_memory(
    case: Any, exported: Callable[..., CachedArtifact]
) -> None:
    # Prepare
    artifact = exported(ArtifactKind.TORCH)
    # Execute
    cpu_losses, cpu_weights, _ = _train("cpu", artifact, case)
    gpu_losses, gpu_weights, peak = _train("cuda", artifact, case)
    # Assert
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
    for name, value in cpu_weights.items():
        np.testing.assert_allclose(gpu_weights[name], value, atol=1e-4, err_msg=name)
    assert peak > sum(v.nbytes for v in cpu_weights.values())  # weights, gradients, momentum, activations
