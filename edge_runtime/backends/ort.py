"""ONNX Runtime Training backend: trains an ORT artifact without torch.

The artifact (export/onnx_training.py) holds the training graph (forward,
loss, backward), the optimizer graph and a *nominal* checkpoint: parameter
names and shapes, no values. `set_weights` fills every parameter with one
contiguous copy in the artifact's `layout` order.

SGD momentum lives inside the training graph: each gradient accumulator
computes b <- g (first step of a task) or b <- momentum * b + g, and the
optimizer graph applies p <- p - lr * b. So gradients are never reset
between steps of a task (the buffer is the momentum); `lazy_reset_grad`
restarts it. AdamW keeps its moments in the checkpoint state, which ONNX
Runtime 1.19 offers no call to clear, so a new task reopens the session.

We call the C bindings (`onnxruntime.capi._pybind_state`: load_checkpoint,
Module, Optimizer) that `onnxruntime.training.api` wraps, not the wrappers:
importing anything under `onnxruntime.training` runs its package __init__,
which imports torch (training/optim/_modifier.py), and a board has no torch.
The bindings are those of the pinned onnxruntime-training 1.19.2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt
from onnxruntime.capi import _pybind_state as ort
from onnxruntime.capi.onnxruntime_inference_collection import (
    OrtValue,
    get_ort_device_type,
)
from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector

from msfusion.errors import ArtifactError
from msfusion.wire.artifacts import (
    ArtifactKind,
    ArtifactManifest,
    check_batch,
    check_tensors,
    check_weights,
    verify_files,
)
from msfusion.wire.weights import unpack_weights

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "nominal_checkpoint"
CONSTANTS = "constants.safetensors"


def explain_ort_error(exc: BaseException, what: str) -> ArtifactError:
    """An `ArtifactError` that names the version or op at fault in an ORT error message."""
    text = str(exc)
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", text)
    if ir:
        return ArtifactError(
            f"{what}: the graph has ONNX IR version {ir.group(1)} but this onnxruntime reads at most "
            f"IR {ir.group(2)}; export with onnx==1.17.0 (IR 10) for onnxruntime-training 1.19"
        )
    opset = re.search(r"(Opset \d+ .*?not .*?supported|Unsupported opset.*?)(\.|$)", text, re.IGNORECASE)
    if opset:
        return ArtifactError(f"{what}: {opset.group(1)}")
    op = re.search(r"(?:Could not find an implementation for|No kernel registered for|not implemented:?)\s*(\S+)", text)
    if op:
        return ArtifactError(f"{what}: onnxruntime has no kernel for op {op.group(1)}")
    if "Protobuf parsing failed" in text or "INVALID_PROTOBUF" in text:
        return ArtifactError(f"{what}: the graph is not a readable ONNX protobuf (truncated or corrupt)")
    first_line = text.strip().splitlines()[0] if text.strip() else repr(exc)
    return ArtifactError(f"{what}: {first_line[-400:]}")


class OrtBackend:
    """Trains ONNX Runtime Training artifacts (`ArtifactKind.ORT`)."""

    kind = ArtifactKind.ORT

    def __init__(self, num_threads: int = 0) -> None:
        self._num_threads = num_threads
        self._dir: Path | None = None
        self._manifest: ArtifactManifest | None = None
        self._constants: dict[str, npt.NDArray[np.float32]] = {}
        self._options: Any = None
        self._device: Any = None
        self._state: Any = None
        self._module: Any = None
        self._optimizer: Any = None
        self._lr: float | None = None
        self._stepped = False

    def load(self, artifact_dir: Path, manifest: ArtifactManifest) -> None:
        """Verify and open the artifact (see `TrainingBackend.load`)."""
        if manifest.kind is not ArtifactKind.ORT:
            raise ArtifactError(f"OrtBackend cannot train a {manifest.kind.value} artifact")
        artifact_dir = Path(artifact_dir)
        verify_files(artifact_dir, manifest)
        self._dir, self._manifest = artifact_dir, manifest
        self._constants = unpack_weights((artifact_dir / CONSTANTS).read_bytes())
        check_tensors("constant", manifest.constants, self._constants)
        self._open()

    def _open(self) -> None:
        if self._dir is None:
            raise ArtifactError("OrtBackend: load an artifact first")
        self.close()
        self._options = ort.SessionOptions()
        # No memory pattern: ORT would plan one block for all activations and take it from its
        # arena rounded up, so peaks jump with the width (ResNet at half width peaked above full
        # width, 753 vs 733 MiB) and the memory model cannot predict them. Without it the peak
        # is lower (ResNet 1/2: 586 MiB; char-LM full: 708 vs 930) and linear in the sizes
        # (fit error < 1%, bench/memory_model.py), at no measured cost in step time.
        self._options.enable_mem_pattern = False
        if self._num_threads > 0:
            self._options.intra_op_num_threads = self._num_threads
        self._device = ort.OrtDevice(get_ort_device_type("cpu", 0), ort.OrtDevice.default_memory(), 0)
        try:
            self._state = ort.load_checkpoint(str(self._dir / CHECKPOINT))
        except Exception as exc:  # noqa: BLE001 (pybind raises RuntimeError subclasses of all kinds)
            raise explain_ort_error(exc, f"loading {CHECKPOINT}") from exc
        try:
            self._module = ort.Module(str(self._dir / TRAINING_MODEL), self._state, None, self._device, self._options)
        except Exception as exc:  # noqa: BLE001
            raise explain_ort_error(exc, f"loading {TRAINING_MODEL}") from exc
        self._lr = None
        self._stepped = False

    def set_weights(
        self,
        trainable: Mapping[str, npt.NDArray[np.float32]],
        frozen: Mapping[str, npt.NDArray[np.float32]],
    ) -> None:
        """Set every parameter and reset the optimizer (see `TrainingBackend.set_weights`)."""
        manifest = self._loaded()
        check_weights(manifest, trainable, frozen)
        if self._stepped and manifest.optimizer.name == "adamw":
            self._open()  # the only way to clear AdamW's moments and step count
        prefix = manifest.param_prefix
        parts = []
        for graph_name in manifest.layout:
            if graph_name.startswith(prefix) and graph_name[len(prefix) :] in trainable:
                value = trainable[graph_name[len(prefix) :]]
            elif graph_name in frozen:
                value = frozen[graph_name]
            elif graph_name in self._constants:
                value = self._constants[graph_name]
            else:
                raise ArtifactError(f"nothing supplies graph parameter {graph_name!r}")
            parts.append(np.asarray(value, dtype=np.float32).reshape(-1))
        buffer = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        try:
            self._module.copy_buffer_to_parameters(OrtValue.ortvalue_from_numpy(buffer)._ortvalue, False)
        except Exception as exc:  # noqa: BLE001
            raise explain_ort_error(exc, "setting weights") from exc
        self._module.lazy_reset_grad()  # SGD: restart the momentum buffer; AdamW: clear gradients
        if self._optimizer is None:
            # Only now: an optimizer built over the nominal (empty) parameters crashes ORT 1.19.
            optimizer_path = str(Path(str(self._dir)) / OPTIMIZER_MODEL)
            try:
                self._optimizer = ort.Optimizer(optimizer_path, self._state, self._device, self._options)
            except Exception as exc:  # noqa: BLE001
                raise explain_ort_error(exc, f"loading {OPTIMIZER_MODEL}") from exc
            self._lr = None

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        """Forward, backward and one optimizer step (see `TrainingBackend.train_step`)."""
        manifest = self._loaded()
        if self._optimizer is None:
            raise ArtifactError("OrtBackend: set_weights before train_step")
        x_info, y_info = check_batch(manifest, x, y)
        x = np.ascontiguousarray(x, dtype=np.dtype(x_info.dtype))
        y = np.ascontiguousarray(y, dtype=np.dtype(y_info.dtype))
        if lr != self._lr:
            self._optimizer.set_learning_rate(float(lr))
            self._lr = lr
        fetches = OrtValueVector()
        try:
            self._module.train_step([x, y], fetches)
            self._optimizer.optimizer_step()
        except Exception as exc:  # noqa: BLE001
            raise explain_ort_error(exc, "training step") from exc
        if manifest.optimizer.name == "adamw":
            self._module.lazy_reset_grad()  # AdamW reads this step's gradient only
        self._stepped = True
        return float(np.asarray(fetches[0].numpy()).reshape(-1)[0])

    def weights(self) -> dict[str, npt.NDArray[np.float32]]:
        """Copies of the trainable tensors by spec name."""
        manifest = self._loaded()
        return {
            info.name: np.array(
                self._state.get_parameter(manifest.param_prefix + info.name).data.numpy(), dtype=np.float32, copy=True
            )
            for info in manifest.params
        }

    def close(self) -> None:
        """Drop the sessions (and with them the runtime's buffers)."""
        self._optimizer = self._module = self._state = None

    def _loaded(self) -> ArtifactManifest:
        if self._manifest is None or self._module is None:
            raise ArtifactError("OrtBackend: load an artifact first")
        return self._manifest
