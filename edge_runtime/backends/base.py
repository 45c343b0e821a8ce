"""The `TrainingBackend` interface and the one factory that picks a backend by artifact kind (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from msfusion.errors import ArtifactError
from msfusion.wire.artifacts import ArtifactKind, ArtifactManifest


class TrainingBackend(Protocol):
    """Trains one artifact: load it, set weights, step, read the weights back.

    Contract (checked over every backend by tests/edge_runtime/test_backends.py):
    - `load` verifies the artifact and raises `ArtifactError` when the runtime
      refuses it.
    - `set_weights` starts a task: it sets every trainable and frozen tensor
      and resets the optimizer state (momentum, moments, step count).
    - `train_step` runs forward, backward and one optimizer step on a batch of
      exactly the artifact's batch size and returns the loss before the step.
    - `weights` returns copies of the trainable tensors under the spec's names.
    """

    kind: ArtifactKind

    def load(self, artifact_dir: Path, manifest: ArtifactManifest) -> None:
        """Load the artifact in `artifact_dir` described by `manifest`.

        Raises:
            ArtifactError: the runtime cannot load it (corrupt file, IR version, missing kernel).
        """
        ...

    def set_weights(
        self,
        trainable: Mapping[str, npt.NDArray[np.float32]],
        frozen: Mapping[str, npt.NDArray[np.float32]],
    ) -> None:
        """Set the trainable tensors (spec names) and the frozen references; reset the optimizer.

        Raises:
            ArtifactError: a missing, unexpected or mis-shaped tensor.
        """
        ...

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        """One optimizer step on batch (x, y) at learning rate `lr`; returns the loss."""
        ...

    def weights(self) -> dict[str, npt.NDArray[np.float32]]:
        """Copies of the trainable tensors, by spec name."""
        ...

    def close(self) -> None:
        """Release the runtime's sessions and buffers."""
        ...


def make_backend(kind: ArtifactKind | str, *, num_threads: int = 0, device: str = "cpu") -> TrainingBackend:
    """The backend that trains artifacts of `kind`.

    The runtime is imported here, not at module import: the ONNX Runtime
    backend needs onnxruntime-training only, the ExecuTorch and torch ones load torch.

    Args:
        kind: artifact kind (or its wire name, "ort" / "executorch" / "torch").
        num_threads: intra-op threads (0 = the runtime's default).
        device: where it trains: "cpu", or "cuda" (the torch backend only).

    Returns:
        An unloaded backend.

    Raises:
        ArtifactError: an unknown kind, its runtime is not installed, or a device it cannot train on
            ("cuda" for ONNX Runtime or ExecuTorch, or where torch sees no CUDA GPU).
    """
    try:
        kind = ArtifactKind(kind)
    except ValueError as exc:
        raise ArtifactError(f"unknown artifact kind {kind!r}") from exc
    if device != "cpu" and kind is not ArtifactKind.TORCH:
        raise ArtifactError(f"the {kind.value} backend trains on the CPU only, not on {device!r}")
    backend: TrainingBackend
    try:
        if kind is ArtifactKind.ORT:
            from msfusion.edge_runtime.backends.ort import OrtBackend

            backend = OrtBackend(num_threads=num_threads)
        elif kind is ArtifactKind.EXECUTORCH:
            from msfusion.edge_runtime.backends.executorch import ExecuTorchBackend

            backend = ExecuTorchBackend(num_threads=num_threads)
        else:
            from msfusion.edge_runtime.backends.torch_native import TorchBackend

            backend = TorchBackend(num_threads=num_threads, device=device)
    except ImportError as exc:
        raise ArtifactError(f"the {kind.value} runtime is not installed on this device: {exc}") from exc
    return backend


def backend_device(kind: ArtifactKind | str, device: str) -> str:
    """Where a backend of `kind` trains on a board whose device.toml says `device`.

    The torch backend trains on `device`; ONNX Runtime and ExecuTorch train on the CPU.
    """
    return device if ArtifactKind(kind) is ArtifactKind.TORCH else "cpu"


@runtime_checkable
class MeasuresAccelerator(Protocol):
    """A backend that trains on an accelerator, whose memory the process's RSS does not show."""

    def peak_accelerator_bytes(self) -> int:
        """Peak bytes held on the accelerator since the last `load` (the runtime's own counter)."""
        ...
