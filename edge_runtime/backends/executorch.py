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

A convolutional model's frozen contrastive references run apart, forward
only, as an inference program (`references.pte`) whose convolutions XNNPACK
runs natively: the training program takes their representations as inputs
(without that file, as for the char-LM, it takes their weights). XNNPACK takes a
convolution's weights only as program constants, so every round
`set_weights` writes the reference weights into a copy of that program's
bytes, at the offsets and in the layouts (`references.json`) the exporter
found and checked, and loads the copy.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
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
    TensorInfo,
    check_batch,
    check_tensors,
    check_weights,
    verify_files,
)

PROGRAM = "program.pte"
METHOD = "forward"
REFERENCES = "references.pte"
REFERENCE_PATCHES = "references.json"


@dataclass(frozen=True)
class ReferencePatch:
    """Where one reference tensor lives in `references.pte`: its bytes, float32, at `offset`, axes in `permute` order."""

    tensor: str
    offset: int
    permute: tuple[int, ...]


@dataclass(frozen=True)
class ReferencePatches:
    """`references.json`: how to write a round's reference weights into the references program.

    Attributes:
        outputs: the program's outputs (z_glob, then z_prev for MOON), the training program's inputs after (x, y).
        patches: every place a reference tensor is stored; tensors the representations do not read have none.
    """

    outputs: tuple[TensorInfo, ...]
    patches: tuple[ReferencePatch, ...]

    def to_json(self) -> str:
        """The table as JSON text."""
        return json.dumps(
            {
                "outputs": [{"name": o.name, "shape": list(o.shape), "dtype": o.dtype} for o in self.outputs],
                "patches": [{"tensor": p.tensor, "offset": p.offset, "permute": list(p.permute)} for p in self.patches],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ReferencePatches:
        """Parse `to_json` output.

        Raises:
            ArtifactError: not JSON or a malformed field.
        """
        try:
            data = json.loads(text)
            return cls(
                outputs=tuple(TensorInfo(**o) for o in data["outputs"]),
                patches=tuple(
                    ReferencePatch(str(p["tensor"]), int(p["offset"]), tuple(int(a) for a in p["permute"]))
                    for p in data["patches"]
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            raise ArtifactError(f"malformed {REFERENCE_PATCHES}: {exc!r}") from exc

    def apply(self, program: bytes, weights: Mapping[str, npt.NDArray[np.float32]]) -> bytearray:
        """A copy of `program` holding `weights` (name -> array, in the reference's own layout).

        Raises:
            ArtifactError: a missing tensor, a permutation of another rank, or a patch outside the program
                (`set_weights` has checked every shape before).
        """
        out = bytearray(program)
        for patch in self.patches:
            if patch.tensor not in weights:
                raise ArtifactError(f"{REFERENCE_PATCHES} names {patch.tensor!r}, which the weights lack")
            array = np.asarray(weights[patch.tensor], dtype=np.float32)
            if sorted(patch.permute) != list(range(array.ndim)):
                raise ArtifactError(
                    f"{REFERENCE_PATCHES}: permutation {patch.permute} of {patch.tensor!r} {array.shape}"
                )
            data = np.ascontiguousarray(array.transpose(patch.permute), dtype="<f4").tobytes()
            if patch.offset < 0 or patch.offset + len(data) > len(out):
                raise ArtifactError(
                    f"{REFERENCE_PATCHES}: {patch.tensor!r} at {patch.offset} lies outside {REFERENCES}"
                )
            out[patch.offset : patch.offset + len(data)] = data
        return out


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
        self._patches: ReferencePatches | None = None  # with a references program (REFERENCES)
        self._reference_program = b""  # as exported; each set_weights patches a copy
        self._reference_bytes = b""
        self._references: Any = None  # this round's references program, loaded by set_weights
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
        artifact_dir = Path(artifact_dir)
        verify_files(artifact_dir, manifest)
        self.close()  # nothing of a previous artifact survives a failed load
        names = {entry.name for entry in manifest.files}
        if REFERENCES in names:
            if REFERENCE_PATCHES not in names:
                raise ArtifactError(f"the artifact has {REFERENCES} but no {REFERENCE_PATCHES}")
            self._patches = ReferencePatches.from_json((artifact_dir / REFERENCE_PATCHES).read_bytes())
            self._reference_program = (artifact_dir / REFERENCES).read_bytes()
        self._manifest = manifest
        # Scaler compensation (OptimizerConfig.scaler_compensation), by graph name, resolved once.
        self._grad_scales = {manifest.param_prefix + name: f for name, f in manifest.grad_scales.items()}
        try:
            with warnings.catch_warnings():  # every training entry point is marked experimental
                warnings.filterwarnings("ignore", message="This API is experimental")
                self._module = _load_for_executorch_for_training(str(artifact_dir / PROGRAM))
            zeros = [torch.zeros(info.shape, dtype=getattr(torch, info.dtype)) for info in manifest.inputs]
            extra = manifest.frozen if self._patches is None else self._patches.outputs
            zeros += [torch.zeros(info.shape) for info in extra]
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
        """Copy the weights into the program (and the references program), and start a fresh optimizer."""
        manifest = self._loaded()
        self._ready = False  # until this task's weights are all in place
        if self._patches is None:
            self._frozen = copy_weights(manifest, self._params, trainable, frozen)
        else:
            check_weights(manifest, trainable, frozen)
            self._references = None  # last round's program goes before this round's loads
            program = bytes(self._patches.apply(self._reference_program, frozen))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="This API is experimental")
                from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
            self._reference_bytes = program  # kept alive while the program runs: it loads in place
            try:
                self._references = _load_for_executorch_from_buffer(program)
            except Exception as exc:  # noqa: BLE001
                raise explain_executorch_error(exc, f"loading {REFERENCES}") from exc
            copy_weights(manifest, self._params, trainable, frozen)
            self._frozen = ()
        self._optimizer = None  # built by the first step, which knows the learning rate
        self._lr = None
        self._ready = True

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        """Forward-backward in the program, then one optimizer step on its weights."""
        manifest = self._loaded()
        if not self._ready:
            raise ArtifactError("ExecuTorchBackend: set_weights before train_step")
        x_info, y_info = check_batch(manifest, x, y)
        x_tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.dtype(x_info.dtype)))
        y_tensor = torch.from_numpy(np.ascontiguousarray(y, dtype=np.dtype(y_info.dtype)))
        try:
            extra = self._frozen if self._patches is None else tuple(self._references.forward([x_tensor]))
            outputs = self._module.forward_backward(METHOD, [x_tensor, y_tensor, *extra])
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
        self._references = None
        self._patches = None
        self._reference_program = self._reference_bytes = b""
        self._module = None
        self._manifest = None
        self._ready = False

    def _loaded(self) -> ArtifactManifest:
        if self._manifest is None or self._module is None:
            raise ArtifactError("ExecuTorchBackend: load an artifact first")
        return self._manifest
