"""ExecuTorch backend: trains an ExecuTorch program through `executorch.extension.training`.

This is the one edge-runtime module that loads torch: ExecuTorch's Python
training bindings link libtorch and hand out torch tensors.

The program's joint method returns [loss, gradients..., parameters...]; the
parameter outputs alias the program's own weights (not copies), so
`set_weights` copies into them and the optimizer updates them in place.
ExecuTorch only hands those aliases out after a first run, so `load` runs
one step on zeros to obtain them (its update is overwritten by `set_weights`).

Optimizers: SGD (with momentum and weight decay) is ExecuTorch's own
`get_sgd_optimizer`, which takes a fixed learning rate per task. ExecuTorch
1.5.1's bindings offer no AdamW, so AdamW is torch.optim.AdamW over the
program's weight aliases: the same update the reference uses.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt
import torch

from msfusion.edge_runtime.backends.torch_native import copy_weights
from msfusion.errors import ArtifactError
from msfusion.wire.artifacts import (
    ArtifactKind,
    ArtifactManifest,
    check_batch,
    check_tensors,
    verify_files,
)

PROGRAM = "program.pte"
METHOD = "forward"


def explain_executorch_error(exc: BaseException, what: str) -> ArtifactError:
    """An `ArtifactError` naming the missing kernel or the load failure."""
    text = str(exc)
    if "kernel" in text and "not found" in text:
        return ArtifactError(f"{what}: this ExecuTorch build lacks a kernel the program needs: {text[-300:]}")
    return ArtifactError(f"{what}: {type(exc).__name__}: {text[-400:]}")


class ExecuTorchBackend:
    """Trains ExecuTorch programs (`ArtifactKind.EXECUTORCH`)."""

    kind = ArtifactKind.EXECUTORCH

    def __init__(self, num_threads: int = 0) -> None:
        if num_threads > 0:
            torch.set_num_threads(num_threads)  # AdamW's update runs in torch
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="This API is experimental")
                from executorch.extension.pybindings.portable_lib import (
                    _threadpool_get_thread_count,
                    _unsafe_reset_threadpool,
                )
            # ExecuTorch's own pool (its optimized kernels and the XNNPACK delegate) starts with one
            # thread per core; "unsafe" as it replaces the pool under any method running, none here.
            if _threadpool_get_thread_count() != num_threads:
                _unsafe_reset_threadpool(num_threads)
        self._manifest: ArtifactManifest | None = None
        self._grad_scales: dict[str, float] = {}
        self._module: Any = None
        self._params: dict[str, torch.Tensor] = {}  # spec name -> alias of the program's weight
        self._frozen: tuple[torch.Tensor, ...] = ()
        self._optimizer: Any = None
        self._lr: float | None = None
        self._ready = False

    def load(self, artifact_dir: Path, manifest: ArtifactManifest) -> None:
        """Verify and load the program, then run it once to reach its weights."""
        with warnings.catch_warnings():  # every training entry point is marked experimental
            warnings.filterwarnings("ignore", message="This API is experimental")
            from executorch.extension.training import _load_for_executorch_for_training

        if manifest.kind is not ArtifactKind.EXECUTORCH:
            raise ArtifactError(f"ExecuTorchBackend cannot train a {manifest.kind.value} artifact")
        verify_files(Path(artifact_dir), manifest)
        self._manifest = manifest
        # Scaler compensation (OptimizerConfig.scaler_compensation), by graph name, resolved once.
        self._grad_scales = {manifest.param_prefix + name: f for name, f in manifest.grad_scales.items()}
        try:
            with warnings.catch_warnings():  # every training entry point is marked experimental
                warnings.filterwarnings("ignore", message="This API is experimental")
                self._module = _load_for_executorch_for_training(str(Path(artifact_dir) / PROGRAM))
            zeros = [torch.zeros(info.shape, dtype=getattr(torch, info.dtype)) for info in manifest.inputs]
            zeros += [torch.zeros(info.shape) for info in manifest.frozen]
            self._module.forward_backward(METHOD, zeros)
            named = self._module.named_parameters()
        except Exception as exc:  # noqa: BLE001 (the bindings raise RuntimeError and others)
            raise explain_executorch_error(exc, f"loading {PROGRAM}") from exc
        prefix = manifest.param_prefix
        self._params = {fqn[len(prefix) :]: tensor for fqn, tensor in named.items() if fqn.startswith(prefix)}
        check_tensors("program", manifest.params, self._params)

    def set_weights(
        self,
        trainable: Mapping[str, npt.NDArray[np.float32]],
        frozen: Mapping[str, npt.NDArray[np.float32]],
    ) -> None:
        """Copy the weights into the program and start a fresh optimizer."""
        self._frozen = copy_weights(self._loaded(), self._params, trainable, frozen)
        self._optimizer = None  # built by the first step, which knows the learning rate
        self._lr = None
        self._ready = True

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        """Forward-backward in the program, then one optimizer step on its weights."""
        manifest = self._loaded()
        if not self._ready:
            raise ArtifactError("ExecuTorchBackend: set_weights before train_step")
        x_info, y_info = check_batch(manifest, x, y)
        inputs = [
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.dtype(x_info.dtype))),
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.dtype(y_info.dtype))),
            *self._frozen,
        ]
        try:
            outputs = self._module.forward_backward(METHOD, inputs)
        except Exception as exc:  # noqa: BLE001
            raise explain_executorch_error(exc, f"running {METHOD}") from exc
        gradients = self._module.named_gradients()
        self._step(gradients, lr)
        return float(outputs[0])

    def _step(self, gradients: Mapping[str, torch.Tensor], lr: float) -> None:
        manifest = self._loaded()
        config = manifest.optimizer
        if config.name == "sgd":
            from executorch.extension.training import get_sgd_optimizer

            if self._optimizer is None:
                named = {manifest.param_prefix + name: tensor for name, tensor in self._params.items()}
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="This API is experimental")
                    self._optimizer = get_sgd_optimizer(named, lr, config.momentum, 0.0, config.weight_decay, False)
                self._lr = lr
            elif lr != self._lr:
                raise ArtifactError("ExecuTorch's SGD takes one learning rate per task; lr changed mid-task")
            with torch.no_grad():  # in place, only the scaled ones: the program rewrites them next step
                for name, factor in self._grad_scales.items():
                    gradients[name].mul_(factor)
            self._optimizer.step(gradients)
            return
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(
                list(self._params.values()),
                lr=lr,
                betas=config.betas,
                eps=config.eps,
                weight_decay=config.weight_decay,
                foreach=False,
            )
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        for name, tensor in self._params.items():
            tensor.grad = gradients[manifest.param_prefix + name]
        self._optimizer.step()

    def weights(self) -> dict[str, npt.NDArray[np.float32]]:
        """Copies of the trainable tensors by spec name."""
        self._loaded()
        return {name: tensor.detach().numpy().astype(np.float32, copy=True) for name, tensor in self._params.items()}

    def close(self) -> None:
        """Drop the program and the optimizer."""
        self._optimizer = None
        self._params = {}
        self._frozen = ()
        self._module = None
        self._ready = False

    def _loaded(self) -> ArtifactManifest:
        if self._manifest is None or self._module is None:
            raise ArtifactError("ExecuTorchBackend: load an artifact first")
        return self._manifest
