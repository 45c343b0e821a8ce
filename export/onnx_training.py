"""Sub-model + local objective -> ONNX Runtime Training artifacts (training, eval, optimizer graphs + checkpoint).

Pipeline: `build_objective` (the reference's own `LocalObjective`, loss inside
the module) -> `torch.onnx.export` (TorchScript exporter, training mode, no
constant folding, opset 17) -> `onnxruntime.training.artifacts.generate_artifacts`
with a pass-through loss block, the sub-model's parameters as `requires_grad`
and the contrastive references as `frozen_params`.

Five things are not stock, each for a stated reason:

- `logsumexp` (the MOON term) is exported as mean(x - LogSoftmax(x)) instead of
  ReduceLogSumExp: onnxruntime-training 1.19's ReduceLogSumExp gradient emits
  an opset-12 Unsqueeze into opset-17 graphs and fails, and ReduceMax (the
  usual stable rewrite) has no gradient at all. The rewrite is exact.
- SGD momentum: ORT's SGD optimizer graph is plain SGD (SGDOptimizerV2). We
  rewrite each gradient accumulator of the training graph so its buffer holds
  torch's momentum buffer, b <- g + wd * p on a task's first step and
  b <- momentum * b + (g + wd * p) after it; the optimizer graph then applies
  p <- p - lr * b. This is torch.optim.SGD (dampening 0, no Nesterov), all in
  the graph, and it stays one ORT step per batch.
- AdamW: ORT's AdamW block uses Hugging Face's update (adam_mode 1); we emit
  the same op with adam_mode 0, which is torch.optim.AdamW's.
- GroupNorm: the models' GroupNorm is written as elementwise ops
  (msfusion/models/registry.py says why); exported as such it costs ORT some twenty
  kernels and their gradients per norm. For the export we trace it as
  F.layer_norm over each group ((B, C, H, W) -> (B, G, C/G*H*W)) and give each
  LayerNormalization node the mean and inv-std outputs its ORT gradient
  (LayerNormalizationGrad) reads: same math, one fused kernel forward and one
  backward. Not the char-LM's LayerNorm: its AdamW's first step divides each
  gradient by its own magnitude, so the fused kernel's different rounding of
  near-zero gradients (bias gradients of ~1e-7) moved weights by up to 1.3e-4
  against the reference's 1e-4 tolerance, for a ~4% faster step.
- MaxPool: ORT's gradient builder gives every MaxPool an indices output, and
  ORT's MaxPool with indices is a slow scalar kernel. The frozen references
  never read theirs, so we drop unread indices outputs (the fast MLAS pooling
  runs instead).

The artifact ships the *nominal* checkpoint only (names and shapes): weights
travel separately and are set by the device (edge_runtime/backends/ort.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.training import artifacts, onnxblock
from onnxruntime.training.api import CheckpointState
from onnxruntime.training.onnxblock.optim.optim import SGD, AdamWOptimizer, _Optimizer

from msfusion.edge_runtime.backends.ort import (
    CHECKPOINT,
    CONSTANTS,
    EVAL_MODEL,
    OPTIMIZER_MODEL,
    TRAINING_MODEL,
)
from msfusion.errors import ArtifactError
from msfusion.export.objective import batch_inputs, loss_signature, random_weights
from msfusion.export.versions import runtime_versions
from msfusion.models import layers
from msfusion.models.config import LossConfig, ModelConfig
from msfusion.models.objective import build_objective
from msfusion.models.registry import model_spec, resolve_widths
from msfusion.wire.artifacts import (
    GLOBAL_REF_PREFIX,
    PREV_REF_PREFIX,
    ArtifactKind,
    ArtifactManifest,
    OptimizerConfig,
    TensorInfo,
    describe_files,
    write_manifest,
)
from msfusion.wire.weights import pack_weights

log = logging.getLogger(__name__)

OPSET = 17
MAX_IR_VERSION = 10  # what onnxruntime-training 1.19 reads
PARAM_PREFIX = "model."  # LocalObjective.model
_ACCUMULATOR = "InPlaceAccumulatorV2"
_GRAD_BUFFER_SUFFIX = "_grad.accumulation.buffer"


def export_submodel(
    model_cfg: ModelConfig,
    widths: Mapping[str, int] | None,
    loss: LossConfig,
    out_dir: Path,
    *,
    optimizer: str | OptimizerConfig = "sgd",
    batch_size: int = 32,
    key: str = "",
    seed: int = 0,
) -> ArtifactManifest:
    """Export the sub-model at `widths` with its local objective as ONNX Runtime Training artifacts.

    Args:
        model_cfg: architecture.
        widths: units per group (None: full width).
        loss: contrastive knobs (baked into the graph).
        out_dir: directory to write the artifact into (created if missing).
        optimizer: "sgd" / "adamw" or a full configuration.
        batch_size: samples per step (the graph's batch axis is static).
        key: the cache key to record in the manifest.
        seed: seeds the placeholder weights traced into the graph (never shipped).

    Returns:
        The manifest, also written as `out_dir/manifest.json`.

    Raises:
        ArtifactError: the exporter or the gradient builder failed (naming the op),
            or the graphs need an IR version onnxruntime cannot read.
    """
    optimizer = OptimizerConfig.of(optimizer)
    widths = resolve_widths(model_spec(model_cfg), widths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Distinct placeholder weights per copy: equal tensors could be merged by the exporter.
    objective = build_objective(
        model_cfg,
        widths,
        loss,
        random_weights(model_cfg, widths, seed),
        random_weights(model_cfg, widths, seed + 1),
        random_weights(model_cfg, widths, seed + 2),
    )
    x_info, y_info = batch_inputs(model_cfg, batch_size)
    model = _to_onnx(objective, x_info, y_info)

    initializers = {init.name: init for init in model.graph.initializer}
    trainable = [PARAM_PREFIX + name for name, _ in objective.model.named_parameters()]
    grad_scales = objective.model.gradient_scales() if optimizer.compensates else {}
    missing = [name for name in trainable if name not in initializers]
    if missing:
        raise ArtifactError(f"the ONNX graph lost trainable tensor {missing[0]!r} (unused by the loss?)")
    # Frozen: the contrastive references, plus any other initializer (a buffer such as a mask).
    not_trainable = [name for name in initializers if name not in set(trainable)]

    with tempfile.TemporaryDirectory(prefix="msfusion-ort-") as scratch:
        try:
            artifacts.generate_artifacts(
                model,
                requires_grad=trainable,
                frozen_params=not_trainable,
                loss=_PassThroughLoss(),
                optimizer=_optimizer_block(optimizer),
                artifact_directory=scratch,
                nominal_checkpoint=True,
            )
        except RuntimeError as exc:
            raise _explain_generate_error(exc) from exc
        training = onnx.load(Path(scratch) / TRAINING_MODEL)
        _drop_unread_pool_indices(training)
        if optimizer.name == "sgd":
            _add_momentum(training, optimizer, {PARAM_PREFIX + n: f for n, f in grad_scales.items()})
        onnx.save(training, out_dir / TRAINING_MODEL)
        for name in (EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
            shutil.copyfile(Path(scratch) / name, out_dir / name)
        layout, values = _parameter_layout(training, Path(scratch) / "checkpoint")

    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        ir_version = onnx.load(out_dir / name, load_external_data=False).ir_version
        if ir_version > MAX_IR_VERSION:
            raise ArtifactError(
                f"{name} has ONNX IR version {ir_version}; onnxruntime-training 1.19 reads at most "
                f"IR {MAX_IR_VERSION}: install onnx==1.17.0"
            )

    def info(name: str) -> TensorInfo:
        return TensorInfo(name, tuple(values[name].shape))

    refs = [n for n in layout if n.startswith((GLOBAL_REF_PREFIX, PREV_REF_PREFIX))]
    constants = [n for n in layout if n not in set(trainable) and n not in set(refs)]
    (out_dir / CONSTANTS).write_bytes(pack_weights({n: values[n] for n in constants}))
    params = tuple(TensorInfo(n[len(PARAM_PREFIX) :], tuple(values[n].shape)) for n in layout if n in set(trainable))
    manifest = ArtifactManifest(
        kind=ArtifactKind.ORT,
        key=key,
        arch=model_cfg.arch,
        files=describe_files(out_dir, [TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT, CONSTANTS]),
        params=params,
        frozen=tuple(info(n) for n in refs),
        inputs=(x_info, y_info),
        optimizer=optimizer,
        loss=loss_signature(loss),
        param_prefix=PARAM_PREFIX,
        layout=tuple(layout),
        constants=tuple(info(n) for n in constants),
        versions=runtime_versions(ArtifactKind.ORT),
        grad_scales=grad_scales,
    )
    write_manifest(out_dir, manifest)
    return manifest


def _to_onnx(objective: torch.nn.Module, x_info: TensorInfo, y_info: TensorInfo) -> onnx.ModelProto:
    """Trace the objective with the TorchScript exporter in training mode."""
    x = torch.zeros(x_info.shape, dtype=getattr(torch, x_info.dtype))
    y = torch.zeros(y_info.shape, dtype=torch.int64)
    buffer = io.BytesIO()
    with _logsumexp_as_logsoftmax(), _group_norm_as_layer_norm(), layers.traceable_norms():
        try:
            torch.onnx.export(
                objective,
                (x, y),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                input_names=["x", "y"],
                output_names=["loss"],
                opset_version=OPSET,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=False,
                export_params=True,
                dynamo=False,
            )
        except Exception as exc:  # noqa: BLE001 (the exporter raises many types)
            raise ArtifactError(f"torch.onnx.export failed: {exc}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    _add_layer_norm_statistics(model)
    return model


@contextlib.contextmanager
def _group_norm_as_layer_norm() -> Iterator[None]:
    """Trace the models' GroupNorm as F.layer_norm over each group (one LayerNormalization node each)."""
    import torch.nn.functional as F

    def group_norm(self: layers.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        group_size = math.prod(int(size) for size in x.shape[1:]) // self.num_groups
        grouped = x.reshape(x.shape[0], self.num_groups, group_size)  # (B, C, H, W) -> (B, G, C/G*H*W)
        normed = F.layer_norm(grouped, (group_size,), eps=self.eps).reshape(x.shape)
        affine_shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        return normed * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)

    saved = layers.GroupNorm.forward
    layers.GroupNorm.forward = group_norm  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        layers.GroupNorm.forward = saved  # type: ignore[method-assign]


def _add_layer_norm_statistics(model: onnx.ModelProto) -> None:
    """Give every LayerNormalization node its Mean and InvStdDev outputs (ORT's gradient reads them)."""
    for index, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            stem = node.name or f"LayerNormalization_{index}"
            node.output.extend([f"{stem}.mean", f"{stem}.inv_std_dev"])


def _drop_unread_pool_indices(model: onnx.ModelProto) -> None:
    """Remove MaxPool indices outputs that no node or graph output reads (the frozen references')."""
    read = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "MaxPool" and len(node.output) == 2 and node.output[1] not in read:
            del node.output[1]


@contextlib.contextmanager
def _logsumexp_as_logsoftmax() -> Iterator[None]:
    """Export aten::logsumexp over one axis as ReduceMean(x - LogSoftmax(x)): exact, with ORT gradients."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "is", "i")
    def logsumexp(g: Any, x: Any, dims: list[int], keepdim: int) -> Any:
        if len(dims) != 1:
            raise ArtifactError(f"logsumexp over {len(dims)} axes has no ORT-trainable export")
        log_probs = g.op("LogSoftmax", x, axis_i=dims[0])
        # x_j - log_softmax(x)_j equals logsumexp(x) for every j; the mean keeps the gradient softmax(x).
        return g.op("ReduceMean", g.op("Sub", x, log_probs), axes_i=dims, keepdims_i=keepdim)

    torch.onnx.register_custom_op_symbolic("aten::logsumexp", logsumexp, OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::logsumexp", OPSET)


class _PassThroughLoss(onnxblock.Block):  # type: ignore[misc]
    """The graph's first output already is the loss (computed inside LocalObjective)."""

    def build(self, loss_name: str) -> str:
        return loss_name


class _TorchAdamW(_Optimizer):  # type: ignore[misc]
    """onnxblock.optim.AdamW with adam_mode 0 (torch.optim.AdamW) instead of 1 (Hugging Face)."""

    def __init__(self, optimizer: OptimizerConfig) -> None:
        super().__init__()
        self._adamw = AdamWOptimizer(
            bias_correction=True, betas=optimizer.betas, eps=optimizer.eps, weight_decay=optimizer.weight_decay
        )

    def _optimizer_specific_logic(self, learning_rate: str, params: str, gradients: str, trainable: Any) -> str:
        graph = self.base.graph
        graph.input.append(helper.make_tensor_sequence_value_info("second_order_moments", trainable[0].data_type, None))
        done = self._adamw(learning_rate, "step", params, gradients, "first_order_moments", "second_order_moments")
        graph.output.append(helper.make_tensor_value_info(done, TensorProto.BOOL, [1]))
        for node in graph.node:
            if node.op_type == "AdamWOptimizer":
                for attribute in node.attribute:
                    if attribute.name == "adam_mode":
                        attribute.i = 0
        return str(done)


def _optimizer_block(optimizer: OptimizerConfig) -> Any:
    """Plain SGD (its momentum goes into the training graph) or torch-mode AdamW."""
    return SGD() if optimizer.name == "sgd" else _TorchAdamW(optimizer)


def _add_momentum(model: onnx.ModelProto, optimizer: OptimizerConfig, grad_scales: Mapping[str, float]) -> None:
    """Turn every gradient accumulator into torch's SGD momentum buffer (see the module docstring).

    Before: buffer <- lazy_reset_grad ? g : buffer + g.
    After:  d = c * g + wd * p;  buffer <- lazy_reset_grad ? d : momentum * buffer + d,
    with c the parameter's scaler compensation (`grad_scales`, graph names; 1 if absent).
    """
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(optimizer.momentum, np.float32), "msfusion.sgd.momentum"),
            numpy_helper.from_array(np.array([True]), "msfusion.sgd.overwrite"),
        ]
    )
    if optimizer.weight_decay > 0:
        graph.initializer.append(
            numpy_helper.from_array(np.array(optimizer.weight_decay, np.float32), "msfusion.sgd.weight_decay")
        )
    nodes = []
    rewritten = 0
    compensated = set()
    for node in graph.node:
        if node.op_type == _ACCUMULATOR:
            buffer, grad, reset = node.input
            param = buffer[: -len(_GRAD_BUFFER_SUFFIX)]
            d, mb, acc, sel = (
                f"{param}.msfusion.{part}" for part in ("direction", "momentum", "accumulated", "buffer")
            )
            if param in grad_scales:
                factor = f"{param}.msfusion.grad_scale"
                graph.initializer.append(numpy_helper.from_array(np.array(grad_scales[param], np.float32), factor))
                nodes.append(helper.make_node("Mul", [grad, factor], [f"{param}.msfusion.scaled_grad"]))
                grad = f"{param}.msfusion.scaled_grad"
                compensated.add(param)
            if optimizer.weight_decay > 0:
                nodes += [
                    helper.make_node("Mul", [param, "msfusion.sgd.weight_decay"], [f"{param}.msfusion.decay"]),
                    helper.make_node("Add", [grad, f"{param}.msfusion.decay"], [d]),
                ]
            else:
                d = grad
            nodes += [
                helper.make_node("Mul", [buffer, "msfusion.sgd.momentum"], [mb]),
                helper.make_node("Add", [mb, d], [acc]),
                helper.make_node("Where", [reset, d, acc], [sel]),
            ]
            del node.input[:]
            node.input.extend([buffer, sel, "msfusion.sgd.overwrite"])
            rewritten += 1
        nodes.append(node)
    if rewritten == 0:
        raise ArtifactError(f"the training graph has no {_ACCUMULATOR} nodes to carry SGD momentum")
    if missing := sorted(set(grad_scales) - compensated):
        raise ArtifactError(f"no gradient accumulator found for the scaler-compensated parameters {missing}")
    del graph.node[:]
    graph.node.extend(nodes)


def _parameter_layout(training: onnx.ModelProto, checkpoint: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Parameter names in ORT's contiguous-buffer order (the training graph's input order), with values."""
    state = CheckpointState.load_checkpoint(checkpoint)
    values = {name: np.array(parameter.data) for name, parameter in state.parameters}
    layout = [inp.name for inp in training.graph.input if inp.name in values]
    if set(layout) != set(values):
        raise ArtifactError("the checkpoint and the training graph disagree on the parameters")
    return layout, values


def _explain_generate_error(exc: RuntimeError) -> ArtifactError:
    text = str(exc)
    no_gradient = re.search(r"gradient builder has not been registered: (\S+) for node ?(\S*)", text)
    if no_gradient:
        node = f" (node {no_gradient.group(2)})" if no_gradient.group(2) else ""
        return ArtifactError(
            f"onnxruntime-training has no gradient for op {no_gradient.group(1)}{node}; "
            "rewrite that op in the model or in its export"
        )
    bad_node = re.search(r"In Node, \(\"([^\"]+)\", (\w+),", text)
    if bad_node:
        return ArtifactError(
            f"onnxruntime-training built an invalid gradient for op {bad_node.group(2)} "
            f"(node {bad_node.group(1)}): {text.strip().splitlines()[-1][-300:]}"
        )
    return ArtifactError(f"generating ORT training artifacts failed: {text.strip().splitlines()[-1][-400:]}")
