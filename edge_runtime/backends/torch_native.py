"""Torch-native backend: trains a `torch.export` program (.pt2) with torch's own kernels and autograd.

For boards that carry torch anyway (a Jetson with NVIDIA's torch build, a
PC): the artifact is the local objective's loss graph that the ExecuTorch
exporter also starts from (`export/executorch.py`, `loss_program`), saved
with `torch.export.save` and loaded here with `torch.export.load`, without
the model's Python code. The frozen references are program inputs; the
sub-model's weights are the program's parameters, which `set_weights` copies
into. Backward is torch's autograd over the loaded graph, the optimizer
`torch.optim.SGD` / `torch.optim.AdamW` with the hyper-parameters of the
manifest: the reference's own update (`msfusion.models.objective.make_optimizer`).

This module and `backends/executorch.py` are the edge runtime's only ones
that load torch.

`device = "cuda"` (device.toml) trains on the GPU: weights, references and
batches live there, and `peak_accelerator_bytes` reports
`torch.cuda.max_memory_allocated` since the last `load`. Where torch sees
no CUDA GPU the backend refuses to start with an `ArtifactError`, so a
daemon configured for a GPU it lacks fails at warm-up, not at its first task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt
import torch

from msfusion.errors import ArtifactError
from msfusion.wire.artifacts import (
    ArtifactKind,
    ArtifactManifest,
    check_batch,
    check_tensors,
    check_weights,
    verify_files,
)

PROGRAM = "program.pt2"
DEVICES = ("cpu", "cuda")


def check_device(device: str) -> torch.device:
    """The torch device for `device` ("cpu" or "cuda").

    Raises:
        ArtifactError: another name, or "cuda" where torch sees no CUDA GPU.
    """
    if device not in DEVICES:
        raise ArtifactError(f"the torch backend trains on {' or '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        raise ArtifactError(
            f"device = 'cuda', but torch {torch.__version__} (built with {built}) sees no CUDA GPU here; "
            "install NVIDIA's torch build for this board or set device = 'cpu'"
        )
    return torch.device(device)


def copy_weights(
    manifest: ArtifactManifest,
    params: Mapping[str, torch.Tensor],
    trainable: Mapping[str, npt.NDArray[np.float32]],
    frozen: Mapping[str, npt.NDArray[np.float32]],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """`set_weights` of a backend whose program holds its weights as torch tensors (this one, ExecuTorch's).

    Checks the tensors against `manifest`, copies `trainable` into the program's `params` (spec name ->
    its tensor) in place, and returns the frozen references on `device`, in the program's input order.

    Raises:
        ArtifactError: a missing, unexpected or mis-shaped tensor.
    """
    check_weights(manifest, trainable, frozen)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.asarray(trainable[name], dtype=np.float32)))
    return tuple(
        torch.from_numpy(np.ascontiguousarray(frozen[info.name], dtype=np.float32)).to(device)
        for info in manifest.frozen
    )


class TorchBackend:
    """Trains torch.export programs (`ArtifactKind.TORCH`) on the CPU or a CUDA GPU.

    Args:
        num_threads: intra-op CPU threads (0: torch's default).
        device: "cpu" or "cuda".

    Raises:
        ArtifactError: an unknown device, or "cuda" without a CUDA GPU.
    """

    kind = ArtifactKind.TORCH

    def __init__(self, num_threads: int = 0, device: str = "cpu") -> None:
        self._device = check_device(device)
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self._manifest: ArtifactManifest | None = None
        self._module: Any = None  # the program's unlifted nn.Module
        self._params: dict[str, torch.nn.Parameter] = {}  # spec name -> the program's parameter
        self._scaled: list[tuple[torch.nn.Parameter, float]] = []
        self._frozen: tuple[torch.Tensor, ...] = ()
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> str:
        """Where it trains: "cpu" or "cuda"."""
        return self._device.type

    def load(self, artifact_dir: Path, manifest: ArtifactManifest) -> None:
        """Verify and load the program onto the device."""
        if manifest.kind is not ArtifactKind.TORCH:
            raise ArtifactError(f"TorchBackend cannot train a {manifest.kind.value} artifact")
        verify_files(Path(artifact_dir), manifest)
        try:
            program = torch.export.load(Path(artifact_dir) / PROGRAM)
            if self._device.type != "cpu":
                # Ops that create tensors (zeros, arange) were traced with device=cpu.
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, self._device.type)
            module = program.module().to(self._device)
        except Exception as exc:  # noqa: BLE001 (deserialization raises many types)
            raise ArtifactError(f"loading {PROGRAM}: {type(exc).__name__}: {str(exc)[-400:]}") from exc
        prefix = manifest.param_prefix
        named = dict(module.named_parameters())
        params = {fqn[len(prefix) :]: p for fqn, p in named.items() if fqn.startswith(prefix)}
        check_tensors("program", manifest.params, params)
        for fqn, param in named.items():  # only the sub-model trains
            param.requires_grad_(fqn.startswith(prefix))
        self._manifest, self._module, self._params = manifest, module, params
        self._scaled = [(params[name], factor) for name, factor in manifest.grad_scales.items()]
        self._optimizer = None
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def set_weights(
        self,
        trainable: Mapping[str, npt.NDArray[np.float32]],
        frozen: Mapping[str, npt.NDArray[np.float32]],
    ) -> None:
        """Copy the weights into the program, set the references and start a fresh optimizer."""
        manifest = self._loaded()
        self._frozen = copy_weights(manifest, self._params, trainable, frozen, self._device)
        for param in self._params.values():
            param.grad = None
        config, params = manifest.optimizer, list(self._params.values())
        # lr is set per step; 0.0 only stands in until then.
        if config.name == "adamw":
            self._optimizer = torch.optim.AdamW(
                params, lr=0.0, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
            )
        else:
            self._optimizer = torch.optim.SGD(
                params, lr=0.0, momentum=config.momentum, weight_decay=config.weight_decay
            )

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        """Forward through the program, autograd backward, scaler compensation, one optimizer step."""
        manifest = self._loaded()
        if self._optimizer is None:
            raise ArtifactError("TorchBackend: set_weights before train_step")
        x_info, y_info = check_batch(manifest, x, y)
        xb = torch.from_numpy(np.ascontiguousarray(x, dtype=np.dtype(x_info.dtype))).to(self._device)
        yb = torch.from_numpy(np.ascontiguousarray(y, dtype=np.dtype(y_info.dtype))).to(self._device)
        try:
            (loss,) = self._module(xb, yb, *self._frozen)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as exc:  # noqa: BLE001 (a kernel or a guard of the program)
            raise ArtifactError(f"running {PROGRAM}: {type(exc).__name__}: {str(exc)[-400:]}") from exc
        with torch.no_grad():
            for param, factor in self._scaled:
                if param.grad is not None:
                    param.grad.mul_(factor)
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._optimizer.step()
        return float(loss.detach())

    def weights(self) -> dict[str, npt.NDArray[np.float32]]:
        """Copies of the trainable tensors by spec name (on the host)."""
        self._loaded()
        return {
            name: param.detach().cpu().numpy().astype(np.float32, copy=True) for name, param in self._params.items()
        }

    def peak_accelerator_bytes(self) -> int:
        """Peak bytes torch allocated on the GPU since `load` (`torch.cuda.max_memory_allocated`; 0 on the CPU)."""
        if self._device.type != "cuda":
            return 0
        return int(torch.cuda.max_memory_allocated(self._device))

    def close(self) -> None:
        """Drop the program, the references and the optimizer (and the GPU's cached blocks)."""
        self._optimizer = None
        self._params = {}
        self._scaled = []
        self._frozen = ()
        self._module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _loaded(self) -> ArtifactManifest:
        if self._manifest is None or self._module is None:
            raise ArtifactError("TorchBackend: load an artifact first")
        return self._manifest
