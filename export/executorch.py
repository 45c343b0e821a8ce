"""Sub-model + local objective -> an ExecuTorch training program (.pte).

Pipeline: `build_objective` (the reference's `LocalObjective`) wrapped so the
frozen references' representations (z_glob, z_prev) are program *inputs*
(`LocalObjective.loss_given`; for a model without convolutions, the
references' weights, `_FrozenAsInputs`) -> `torch.export.export` ->
`_export_forward_backward` (joint graph: loss, then gradients, then
parameters) -> `executorch.exir.to_edge_transform_and_lower(...)` with the
XNNPACK partitioner -> `.to_executorch()`. The device trains it through
`executorch.extension.training` (edge_runtime/backends/executorch.py).

The references themselves, forward only, are a second program
(`export_references`, `references.pte`): there XNNPACK runs their
convolutions natively, with no im2col, which it does only for constant
weights. The weights change every round, so the exporter also writes where
each one lies in that program's bytes and in which layout
(`references.json`), checked by patching in other weights and comparing
with torch; the device writes each round's references there and loads the
copy. Against the references' weights as inputs of the training program
(one thread, steps taken in turns, AMD EPYC): the ResNet's step at widths
1, 1/2, 1/4 takes 0.90, 0.87, 0.83 the time, the CNN's 1.03, 0.96, 0.79.
Only models with convolutions get it: the char-LM's took 1.01, 1.13, 0.99.
XNNPACK's f32 convolution is no match for torch's own, though: a ResNet
forward at width 1 takes 91 ms there, 68 in torch eager.

One workaround, for a kernel bug: ExecuTorch 1.5.1's portable
`max_pool2d_with_indices_backward` scatter-adds into an output it never
zeroes, so every Conv -> MaxPool gradient picks up stale memory
(pytorch/executorch#21686, fixed after 1.5.1 by #21878). We decompose
non-overlapping max pooling into reshape + amax before autograd, so the
backward is eq/sum/div/mul. Its gradient splits a tie evenly where
max_pool2d gives it all to the first maximum; a tie is a window of equal
values, which equal inputs upstream give (a blank background), and the
weight gradients then agree (tests/export: a CNN on images with a
constant background tracks the reference). Validation (export/validate.py)
is what catches kernels like that one.

Rewrites for speed. The training bindings run the kernels of
`libexecutorch_kernels_optimized.so` (blocked-GEMM `mm`/`bmm`, vectorized
add/mul; portable loops for everything else, convolution among them: a CNN
step took 26-38x torch eager, a ResNet step 76x) and the XNNPACK delegate
the wheel links. So:

- every 2-D convolution becomes im2col over the channels-first input (one
  zero pad, one unit-stride slice per kernel tap, a strided convolution's
  taps read from its input's phase planes by space-to-depth, one cat) and
  one `mm`; every linear layer `mm` + add: the backward is GEMMs, pads and
  slices, with no portable strided slice;
- a unit-stride convolution is decomposed only after autograd, in the joint
  graph (`_convolution_as_matmul`, `_convolution_backward_as_matmul`): its
  input gradient is then im2col of the output gradient (one pad, one slice
  per tap, a cat, one product) instead of autograd's col2im (every tap's
  gradient padded to the input's size, then summed); from 32 channels its
  patches are channels-last, so the product XNNPACK packs on every call
  takes the weight, not the patches; the weight gradient's recomputed
  patches are merged into the forward's (`_merge_duplicates`). ResNet
  training program at width 1: 0.79-0.87x the time (ab, one thread);
- max_pool2d(relu(x)) becomes relu(max_pool2d(x)) (`_pool_before_relu`):
  ReLU and its portable backward (le, where) run on a quarter of the
  elements;
- in the joint graph, four of autograd's formulas become the same values
  computed by XNNPACK ops instead of portable kernels over the full shape:
  a mean's expand(g) / n becomes a broadcast inside the op that consumes it
  (`_broadcast_instead_of_expand`); ReLU's where(out <= 0, 0, g) becomes
  g * ceil(clamp(out, 0, 1)) (`_relu_backward_as_mul`); a slice's gradient,
  a slice_scatter into zeros, becomes a zero pad (`_scatter_into_zeros_as_pad`);
  amax's tie mask x == amax(x) becomes 1 - ceil(clamp(amax(x) - x, 0, 1))
  (`_tie_mask_as_arithmetic`);
- and five more on the joint graph, each removing a copy or a portable pass
  (ResNet step 1.2-1.3x faster, ab runs side by side): a zero pad's
  gradient (negative pad) as slices (`_negative_pad_as_slices`); a sum over
  (0, 2, 3) as one over the contiguous H*W first (`_sum_trailing_first`);
  a weight gradient g @ patches.t() as linear(g, patches), without
  materializing the transposed patches (`_transposed_product_as_linear`);
  a reshaped permute's clone + copy as one permute_copy
  (`_contiguous_permute_as_copy`); the norms' long-row means and sums as a
  product by a constant row (`_row_reduction_as_product`);
- the program is lowered with XNNPACK's partitioner, which takes every matrix
  product (with `force_non_static_weights_for_f32_linear`: the gradients'
  products have no constant operand), every transpose and most elementwise
  ops (add, mul, sub, div, softmax, gelu, ...) into delegate calls. ExecuTorch's
  own `mm` ran ~25 GFLOP/s on the benchmark machine, XNNPACK's ~4x that, and
  the portable `permute_copy` (every attention head split) was 18% of a
  char-LM step; after lowering a char-LM step is 3.2x faster, a CNN step
  2.3x. With the graph rewrites above, a step at width 1 takes
  1.22x torch eager's time on the CNN (2.75x without them), 2.11x on the
  ResNet (3.26x), 0.76x on the char-LM (0.87x) (bench/results/README.md).
  Delegate calls run on ExecuTorch's threadpool, the backend's
  `num_threads`.

The price is memory: the im2col matrix (kernel taps x the input) is kept for
the backward. Same function; validation checks every program against torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from msfusion.edge_runtime.backends.executorch import (
    METHOD,
    PROGRAM,
    REFERENCE_PATCHES,
    REFERENCES,
    ReferencePatch,
    ReferencePatches,
)
from msfusion.errors import ArtifactError
from msfusion.export.objective import batch_inputs, loss_signature, random_batch, random_weights
from msfusion.export.versions import runtime_versions
from msfusion.models.config import LossConfig, ModelConfig
from msfusion.models.layers import traceable_norms
from msfusion.models.objective import LocalObjective, build_objective
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

log = logging.getLogger(__name__)

PARAM_PREFIX = "objective.model."  # _FrozenAsInputs.objective.model


class _FrozenAsInputs(nn.Module):
    """forward(x, y, *frozen) -> (loss,): the objective with its references read from inputs."""

    def __init__(self, objective: nn.Module, frozen_names: Sequence[str]) -> None:
        super().__init__()
        self.objective = objective
        self.frozen_names = tuple(frozen_names)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *frozen: torch.Tensor) -> tuple[torch.Tensor]:
        tensors = dict(zip(self.frozen_names, frozen))
        loss: torch.Tensor = torch.func.functional_call(self.objective, tensors, (x, y), strict=False)
        return (loss,)


class _RepresentationsAsInputs(nn.Module):
    """forward(x, y, *representations) -> (loss,): the objective with its references' z_glob (z_prev) read from inputs."""

    def __init__(self, objective: LocalObjective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor, *representations: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.objective.loss_given(x, y, *representations),)


class _References(nn.Module):
    """forward(x) -> (z_glob,) or (z_glob, z_prev): the frozen references' representations, forward only."""

    def __init__(self, global_ref: nn.Module, prev_ref: nn.Module | None) -> None:
        super().__init__()
        self.global_ref = global_ref
        self.prev_ref = prev_ref

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z_glob = self.global_ref(x)[1]
        return (z_glob,) if self.prev_ref is None else (z_glob, self.prev_ref(x)[1])


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
    """Export the sub-model at `widths` with its local objective as an ExecuTorch training program.

    The optimizer is not part of the program: the device applies it to the
    program's gradients (`ArtifactManifest.optimizer` says which one).

    Args:
        model_cfg: architecture.
        widths: units per group (None: full width).
        loss: contrastive knobs (baked into the graph).
        out_dir: directory to write the artifact into (created if missing).
        optimizer: "sgd" / "adamw" or a full configuration.
        batch_size: samples per step (static).
        key: the cache key to record in the manifest.
        seed: seeds the placeholder weights traced into the program (overwritten on the device).

    Returns:
        The manifest, also written as `out_dir/manifest.json`.

    Raises:
        ArtifactError: torch.export, autograd or lowering failed.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.export.experimental import _export_forward_backward

    optimizer = OptimizerConfig.of(optimizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = loss_program(model_cfg, widths, loss, batch_size, seed, references_apart=True)
    files = [PROGRAM]
    if graph.references is not None:
        x, _ = random_batch(model_cfg, batch_size, np.random.default_rng(seed))
        x_tensor = torch.from_numpy(x)
        references, patches = export_references(graph.references, graph.frozen, x_tensor, seed=seed + 3)
        (out_dir / REFERENCES).write_bytes(references)
        (out_dir / REFERENCE_PATCHES).write_text(patches.to_json())
        files += [REFERENCES, REFERENCE_PATCHES]
    try:
        program = _pool_before_relu(graph.program)
        program = program.run_decompositions(
            {
                torch.ops.aten.max_pool2d.default: _max_pool2d_as_amax,
                torch.ops.aten.conv2d.default: _conv2d_before_autograd,
                torch.ops.aten.linear.default: _linear_as_mm,
            }
        )
        program = _export_forward_backward(program)
        program = program.run_decompositions(
            {
                torch.ops.aten.convolution.default: _convolution_as_matmul,
                torch.ops.aten.convolution_backward.default: _convolution_backward_as_matmul,
            }
        )
        _merge_duplicates(program)
        _broadcast_instead_of_expand(program)
        _negative_pad_as_slices(program)
        _relu_backward_as_mul(program)
        _scatter_into_zeros_as_pad(program)
        _tie_mask_as_arithmetic(program)
        _sum_trailing_first(program)
        _transposed_product_as_linear(program)
        _contiguous_permute_as_copy(program)
        _row_reduction_as_product(program)
        # The gradients' matrix products have no constant operand: XNNPACK takes them as "dynamic" ones.
        xnnpack = XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[xnnpack],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        executorch_program = edge.to_executorch()
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 (export, autograd and lowering raise many types)
        raise ArtifactError(f"ExecuTorch export failed: {type(exc).__name__}: {str(exc)[-600:]}") from exc
    (out_dir / PROGRAM).write_bytes(executorch_program.buffer)

    manifest = graph.manifest(
        ArtifactKind.EXECUTORCH, out_dir, files, arch=model_cfg.arch, key=key, optimizer=optimizer, loss=loss
    )
    log.info("exported ExecuTorch program %s (%d bytes, method %s)", key[:12], len(executorch_program.buffer), METHOD)
    return manifest


def export_references(
    references: nn.Module, frozen: Sequence[TensorInfo], x: torch.Tensor, *, seed: int
) -> tuple[bytes, ReferencePatches]:
    """The references' forward as an XNNPACK inference program, and where its weights lie in it.

    Why apart from the training program: there a convolution is im2col + mm, as its weights train;
    with constant weights XNNPACK runs it natively (a ResNet step 0.83-0.90x the time, one thread). XNNPACK stores constants in its own layouts (OHWI; a one-channel-in convolution as
    depthwise, HWO) under content hashes, so the program is exported with random weights, each tensor
    is located in the program's bytes in each layout (`_locate`), and the table is checked: the
    program patched with other random weights must compute what torch does with them.

    Args:
        references: `LossProgram.references`; its parameters are the `frozen` tensors.
        frozen: the reference tensors, by name.
        x: an example batch, real data's shape and type (the check runs it).
        seed: seeds the two sets of random weights.

    Raises:
        ArtifactError: lowering failed, or the patched program disagrees with torch (a tensor the
            table misses, or a layout it does not know).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
    from torch.export import export

    rng = np.random.default_rng(seed)
    calibration = {info.name: (0.5 * rng.standard_normal(info.shape)).astype(np.float32) for info in frozen}
    _load_references(references, calibration)
    try:
        with traceable_norms():
            program = export(references, (x,), strict=False)
        buffer = bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    except Exception as exc:  # noqa: BLE001 (export and lowering raise many types)
        raise ArtifactError(
            f"ExecuTorch export of the references failed: {type(exc).__name__}: {str(exc)[-600:]}"
        ) from exc
    with torch.no_grad():
        representations = references(x)
    outputs = tuple(TensorInfo(name, tuple(z.shape)) for name, z in zip(("z_glob", "z_prev"), representations))
    patches = ReferencePatches(outputs, tuple(_locate(buffer, calibration)))

    check = {info.name: (0.5 * rng.standard_normal(info.shape)).astype(np.float32) for info in frozen}
    _load_references(references, check)
    with torch.no_grad():
        expected = references(x)
    patched = bytes(patches.apply(buffer, check))  # alive while the program runs: it loads in place
    try:
        got = _load_for_executorch_from_buffer(patched).forward([x])
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"the references program does not run: {type(exc).__name__}: {str(exc)[-400:]}") from exc
    for info, want, have in zip(outputs, expected, got):
        error = float((have - want).abs().max())
        if not error <= 1e-3 * max(1.0, float(want.abs().max())):
            raise ArtifactError(
                f"the references program, given new weights, is off torch by {error:.3g} in {info.name}: "
                "a weight lies in a layout the table does not know"
            )
    return buffer, patches


# The layouts XNNPACK stores a constant in, by rank: as is, OHWI (a convolution), HWO (a
# convolution with one input channel, taken as depthwise), transposed (a matrix).
_LAYOUTS: dict[int, tuple[tuple[int, ...], ...]] = {4: ((0, 1, 2, 3), (0, 2, 3, 1), (1, 2, 3, 0)), 2: ((0, 1), (1, 0))}


def _locate(buffer: bytes, weights: Mapping[str, np.ndarray]) -> list[ReferencePatch]:
    """Every place each of `weights` (random, so each one's bytes are unique) lies in `buffer`, in any layout."""
    patches = []
    for name, array in weights.items():
        found: set[int] = set()
        for permute in _LAYOUTS.get(array.ndim, (tuple(range(array.ndim)),)):
            data = np.ascontiguousarray(array.transpose(permute), dtype="<f4").tobytes()
            at = buffer.find(data)
            while at >= 0:
                if at not in found:
                    found.add(at)
                    patches.append(ReferencePatch(name, at, permute))
                at = buffer.find(data, at + 1)
    return patches


def _load_references(references: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, parameter in references.named_parameters():
            parameter.copy_(torch.from_numpy(weights[name]))


@dataclass(frozen=True)
class LossProgram:
    """The local objective's loss as a `torch.export` program, the frozen references among its inputs.

    Attributes:
        program: forward(x, y, *frozen) -> (loss,); or, with `references`, forward(x, y, *representations).
            The sub-model's weights are its parameters (graph names `PARAM_PREFIX + spec name`).
        params: the trainable tensors (spec names), in program order.
        frozen: the frozen references (`global_ref.` / `prev_ref.` + spec name), in input order; with
            `references`, that module's parameters.
        inputs: the static batch (x, y).
        grad_scales: spec name -> the scaler compensation factor of its gradient.
        references: forward(x) -> the representations `program` reads (`_References`), or None where
            the references are inputs or the contrastive term is off.
    """

    program: ExportedProgram
    params: tuple[TensorInfo, ...]
    frozen: tuple[TensorInfo, ...]
    inputs: tuple[TensorInfo, TensorInfo]
    grad_scales: Mapping[str, float]
    references: nn.Module | None = None

    def manifest(
        self,
        kind: ArtifactKind,
        out_dir: Path,
        files: list[str],
        *,
        arch: str,
        key: str,
        optimizer: OptimizerConfig,
        loss: LossConfig,
    ) -> ArtifactManifest:
        """The manifest of an artifact of `kind` made from this program, its `files` in `out_dir`.

        Also written as `out_dir/manifest.json`.
        """
        manifest = ArtifactManifest(
            kind=kind,
            key=key,
            arch=arch,
            files=describe_files(out_dir, files),
            params=self.params,
            frozen=self.frozen,
            inputs=self.inputs,
            optimizer=optimizer,
            loss=loss_signature(loss),
            param_prefix=PARAM_PREFIX,
            versions=runtime_versions(kind),
            grad_scales=self.grad_scales if optimizer.compensates else {},
        )
        write_manifest(out_dir, manifest)
        return manifest


def loss_program(
    model_cfg: ModelConfig,
    widths: Mapping[str, int] | None,
    loss: LossConfig,
    batch_size: int,
    seed: int = 0,
    *,
    references_apart: bool = False,
) -> LossProgram:
    """Export the sub-model at `widths` with its local objective as a loss graph (`torch.export.export`).

    The ExecuTorch exporter lowers it further; the torch-native one (`export/torch_native.py`) saves it as is.
    With `references_apart` (ExecuTorch) and a model with convolutions, the graph reads the references'
    representations instead of their weights, and `LossProgram.references` computes them. (Without
    convolutions XNNPACK has nothing native to gain: the char-LM's step, references apart, measured
    0.99-1.13x the step with them inside.)

    Raises:
        ArtifactError: torch.export failed.
    """
    from torch.export import export

    widths = resolve_widths(model_spec(model_cfg), widths)
    objective = build_objective(
        model_cfg,
        widths,
        loss,
        random_weights(model_cfg, widths, seed),
        random_weights(model_cfg, widths, seed + 1),
        random_weights(model_cfg, widths, seed + 2),
    )
    refs = {
        name: tensor.detach()
        for name, tensor in objective.named_parameters()
        if name.startswith((GLOBAL_REF_PREFIX, PREV_REF_PREFIX))
    }
    x_info, y_info = batch_inputs(model_cfg, batch_size)
    x = torch.zeros(x_info.shape, dtype=getattr(torch, x_info.dtype))
    y = torch.zeros(y_info.shape, dtype=torch.int64)
    references = None
    wrapper: nn.Module
    convolutional = any(isinstance(module, nn.Conv2d) for module in objective.model.modules())
    if references_apart and convolutional and objective.global_ref is not None:
        references = _References(objective.global_ref, objective.prev_ref)
        with torch.no_grad():
            example: tuple[torch.Tensor, ...] = (x, y, *references(x))
        objective.global_ref = objective.prev_ref = None  # not the training program's parameters
        wrapper = _RepresentationsAsInputs(objective)
    else:
        # The references stop being parameters of the program: functional_call feeds them from inputs.
        for prefix in (GLOBAL_REF_PREFIX, PREV_REF_PREFIX):
            ref_module = getattr(objective, prefix.rstrip("."))
            if ref_module is not None:
                _parameters_to_plain_tensors(ref_module)
        wrapper = _FrozenAsInputs(objective, list(refs))
        example = (x, y, *refs.values())
    try:
        with traceable_norms():
            program = export(wrapper, example, strict=False)
    except Exception as exc:  # noqa: BLE001 (torch.export raises many types)
        raise ArtifactError(f"torch.export failed: {type(exc).__name__}: {str(exc)[-600:]}") from exc
    return LossProgram(
        program=program,
        params=tuple(TensorInfo(name, tuple(tensor.shape)) for name, tensor in objective.model.named_parameters()),
        frozen=tuple(TensorInfo(name, tuple(tensor.shape)) for name, tensor in refs.items()),
        inputs=(x_info, y_info),
        grad_scales=objective.model.gradient_scales(),
        references=references,
    )


def _parameters_to_plain_tensors(module: nn.Module) -> None:
    """Replace every parameter of `module` by a plain tensor attribute (not lifted into the program)."""
    for submodule in module.modules():
        for name, parameter in list(submodule.named_parameters(recurse=False)):
            del submodule._parameters[name]
            setattr(submodule, name, parameter.detach())


def _pool_before_relu(program: ExportedProgram) -> ExportedProgram:
    """Rewrite every max_pool2d(relu(x)) into relu(max_pool2d(x)), in place: the same function.

    Max pooling commutes with any nondecreasing function, so the output is
    the same; the gradient too, except between tied positive maxima, which
    only a window of identical values (identical inputs upstream) has. ReLU
    and its backward (le + where, both portable kernels) then run on the
    pooled tensor, a quarter of the elements: ~10% of a CNN step.
    """
    graph = program.graph_module.graph
    relu, pool = torch.ops.aten.relu.default, torch.ops.aten.max_pool2d.default
    for node in list(graph.nodes):
        source = node.args[0] if node.target is pool else None
        if not isinstance(source, torch.fx.Node) or source.target is not relu or len(source.users) != 1:
            continue
        with graph.inserting_before(node):
            pooled = graph.call_function(pool, (source.args[0], *node.args[1:]), dict(node.kwargs))
            activated = graph.call_function(relu, (pooled,))
        pooled.meta = dict(node.meta)
        activated.meta = dict(source.meta, val=node.meta["val"])
        node.replace_all_uses_with(activated)
        graph.erase_node(node)
        graph.erase_node(source)
    graph.lint()
    program.graph_module.recompile()
    return program


_SCALAR_OPS = (torch.ops.aten.div.Scalar, torch.ops.aten.mul.Scalar)
_BROADCASTING_OPS = (
    torch.ops.aten.add.Tensor,
    torch.ops.aten.sub.Tensor,
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.div.Tensor,
)


def _broadcast_instead_of_expand(program: ExportedProgram) -> None:
    """Drop the joint graph's `expand`s where an elementwise op would broadcast anyway, in place.

    Autograd writes the gradient of a mean as expand(g) / n: ExecuTorch runs
    both as portable kernels over the full shape (expand_copy materializes
    it; a GroupNorm's means cost ~8% of a CNN step). Here expand(g) / n
    becomes expand(g / n), and op(x, expand(g)) with x of the expanded shape
    becomes op(x, g), which the (XNNPACK) op broadcasts: the same values.
    """
    graph = program.graph_module.graph
    expand = torch.ops.aten.expand.default
    work = [node for node in graph.nodes if node.target is expand]
    while work:
        node = work.pop()
        source, shape = node.args[0], node.meta["val"].shape
        if not isinstance(source, torch.fx.Node):
            continue
        for user in list(node.users):
            if user.target in _SCALAR_OPS and user.args[0] is node:
                with graph.inserting_before(user):
                    scaled = graph.call_function(user.target, (source, *user.args[1:]))
                    moved = graph.call_function(expand, (scaled, node.args[1]))
                value = source.meta["val"]
                with value.fake_mode:
                    scaled.meta["val"] = user.target(value, *user.args[1:])
                moved.meta = dict(user.meta)
                user.replace_all_uses_with(moved)
                graph.erase_node(user)
                work.append(moved)
            elif user.target in _BROADCASTING_OPS and not user.kwargs and user.meta["val"].shape == shape:
                others = [arg for arg in user.args if arg is not node]
                if len(others) == 1 and isinstance(others[0], torch.fx.Node) and others[0].meta["val"].shape == shape:
                    user.replace_input_with(node, source)
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def _source(node: Any, through: tuple[Any, ...] = (torch.ops.aten.alias.default,)) -> Any:
    """`node` with the joint graph's `alias`es (saved activations), or the ops `through`, looked through."""
    while isinstance(node, torch.fx.Node) and node.target in through:
        node = node.args[0]
    return node


def _relu_backward_as_mul(program: ExportedProgram) -> None:
    """ReLU's gradient where(out <= 0, 0, g) as g * ceil(clamp(out, 0, 1)), in place.

    out is the ReLU's output (>= 0): clamp to [0, 1] then ceil gives exactly
    0 where out is 0 and 1 elsewhere, so the product is the same gradient.
    The stock form is two portable kernels over the full shape (`le`, and
    `where` with a broadcast scalar, ~7 ns an element: 34 ms of a ResNet
    step); clamp, ceil and mul are XNNPACK's.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.where.self or len(node.args) != 3:
            continue
        cond, zero, grad = node.args
        if not (
            isinstance(cond, torch.fx.Node)
            and cond.target is aten.le.Scalar
            and cond.args[1] == 0
            and isinstance(zero, torch.fx.Node)
            and zero.target is aten.scalar_tensor.default
            and zero.args[0] == 0
            and isinstance(grad, torch.fx.Node)
        ):
            continue
        out: Any = cond.args[0]
        if getattr(_source(out), "target", None) is not aten.relu.default:
            continue
        value = out.meta["val"]
        if grad.meta["val"].shape != node.meta["val"].shape or value.shape != node.meta["val"].shape:
            continue
        with graph.inserting_before(node):
            clamped = graph.call_function(aten.clamp.default, (out, 0.0, 1.0))
            mask = graph.call_function(aten.ceil.default, (clamped,))
            product = graph.call_function(aten.mul.Tensor, (mask, grad))  # laid out as the (dense) mask
        with value.fake_mode:
            clamped.meta["val"] = aten.clamp.default(value, 0.0, 1.0)
            mask.meta["val"] = aten.ceil.default(clamped.meta["val"])
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        if not cond.users:
            graph.erase_node(cond)
        if not zero.users:
            graph.erase_node(zero)
    graph.lint()
    program.graph_module.recompile()


def _scatter_into_zeros_as_pad(program: ExportedProgram) -> None:
    """slice_scatter(zeros, g, dim, start, end) -> constant_pad_nd(g, (start, size - end) at dim), in place.

    Autograd writes the gradient of a slice (every im2col tap, every padding
    cut) as a slice_scatter into a fresh zero tensor: two portable passes
    over the full shape (`full`, then `slice_scatter`, which copies its
    input before writing `g`), ~20% of a ResNet step. Padding `g` with
    zeros is the same tensor, and XNNPACK pads (non-negative amounts).
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.slice_scatter.default:
            continue
        base, src, *rest = node.args
        dim, start, end, step = (list(rest) + [0, None, None, 1][len(rest) :])[:4]
        if step != 1 or not isinstance(base, torch.fx.Node) or not isinstance(src, torch.fx.Node):
            continue
        if base.target is not aten.full.default or base.args[1] != 0 or len(base.users) != 1:
            continue
        shape = base.meta["val"].shape
        dim = dim % len(shape)
        size = shape[dim]
        start = 0 if start is None else (start + size if start < 0 else min(start, size))
        end = size if end is None else (end + size if end < 0 else min(end, size))
        if src.meta["val"].shape[dim] != end - start or src.meta["val"].dtype != base.meta["val"].dtype:
            continue
        pad = [0, 0] * (len(shape) - 1 - dim) + [start, size - end]
        if src.target is aten.constant_pad_nd.default and len(src.users) == 1 and src.args[2:] in ((), (0.0,)):
            inner = list(cast(Sequence[int], src.args[1]))  # a tap's two cuts, one pad: each pass costs
            inner += [0] * (len(pad) - len(inner))
            pad = [a + b for a, b in zip(inner, pad + [0] * (len(inner) - len(pad)))]
            src = src.args[0]
        with graph.inserting_before(node):
            padded = graph.call_function(aten.constant_pad_nd.default, (src, pad, 0.0))
        padded.meta = dict(node.meta)
        node.replace_all_uses_with(padded)
        graph.erase_node(node)
        graph.erase_node(base)
    graph.eliminate_dead_code()
    graph.lint()
    program.graph_module.recompile()


def _sum_trailing_first(program: ExportedProgram) -> None:
    """sum(t, dims) over leading and trailing dims as a sum over the flattened trailing dims first, in place.

    A norm's affine gradients sum the (B, C, H, W) output gradient over
    (0, 2, 3): the portable kernel walks that strided set at ~3 GB/s (1.1
    ms per 28x28 ResNet sum). Summed over the contiguous H*W first, then
    over B on the small (B, C) result, the same sum runs at the speed of
    a contiguous reduction. Float addition is reordered, so the value
    agrees within rounding.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
            continue
        t, dims, *rest = node.args
        keepdim = bool(rest[0]) if rest else False
        value = t.meta["val"]
        rank = value.dim()
        reduced = sorted({d % rank for d in cast(Sequence[int], dims or range(rank))})
        trailing = 0
        while trailing < rank and rank - 1 - trailing in reduced:
            trailing += 1
        if trailing == 0 or trailing == len(reduced) or not value.is_contiguous():
            continue  # nothing trailing to go first, only trailing dims (one contiguous sum), or no view
        kept = list(value.shape[: rank - trailing])
        with graph.inserting_before(node):
            flat = graph.call_function(aten.view.default, (t, kept + [-1]))
            inner = graph.call_function(aten.sum.dim_IntList, (flat, [-1]))
            outer = graph.call_function(aten.sum.dim_IntList, (inner, reduced[: len(reduced) - trailing], keepdim))
            shaped = graph.call_function(aten.view.default, (outer, list(node.meta["val"].shape)))
        with value.fake_mode:
            flat.meta["val"] = value.reshape(kept + [-1])
            inner.meta["val"] = flat.meta["val"].sum(dim=[-1])
            outer.meta["val"] = inner.meta["val"].sum(dim=reduced[: len(reduced) - trailing], keepdim=keepdim)
            shaped.meta["val"] = outer.meta["val"].reshape(node.meta["val"].shape)
        node.replace_all_uses_with(shaped)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def _transposed_product_as_linear(program: ExportedProgram) -> None:
    """mm(a, b.t()) -> linear(a, b), in place: the same product, without materializing b's transpose.

    XNNPACK takes `mm(a, m)` as a fully-connected op whose weights are m read
    transposed; given m = b.t(), the delegate first copies b into that
    transpose. Autograd writes every weight gradient of an im2col
    convolution that way (grad_out @ patches.t(), the patches 9x the
    input), ~5% of a ResNet step in transposes. `linear(a, b)` is a @ b.t()
    with b in the fully-connected op's own (out, in) layout: no copy.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    transposes = (aten.t.default, aten.permute.default, aten.transpose.int)
    for node in list(graph.nodes):
        if node.target is not aten.mm.default:
            continue
        a, m = node.args
        if not (isinstance(m, torch.fx.Node) and m.target in transposes and m.meta["val"].dim() == 2):
            continue
        if m.target is aten.permute.default and list(cast(Sequence[int], m.args[1])) != [1, 0]:
            continue
        b = m.args[0]
        with graph.inserting_before(node):
            product = graph.call_function(aten.linear.default, (a, b))
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        if not m.users:
            graph.erase_node(m)
    graph.lint()
    program.graph_module.recompile()


def _contiguous_permute_as_copy(program: ExportedProgram) -> None:
    """clone(permute(x), contiguous) -> permute_copy(x), in place: one copy where the program made two.

    Reshaping a permuted tensor (every im2col convolution's output, moved
    back to (B, C, H, W) and then grouped by its norm; every output
    gradient moved channels-first for the weight's product) is a
    contiguous clone and a view. In the lowered program a permute is
    already a copy into a contiguous tensor, so the clone copies it again;
    permute_copy is that one copy, its result contiguous, and the view then
    reads it as it is.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.clone.default or node.kwargs.get("memory_format") is not torch.contiguous_format:
            continue
        permuted = node.args[0]
        if not (isinstance(permuted, torch.fx.Node) and permuted.target is aten.permute.default):
            continue
        with graph.inserting_before(node):
            copied = graph.call_function(aten.permute_copy.default, permuted.args)
        copied.meta = dict(node.meta)
        node.replace_all_uses_with(copied)
        graph.erase_node(node)
        if not permuted.users:
            graph.erase_node(permuted)
    graph.lint()
    program.graph_module.recompile()


def _negative_pad_as_slices(program: ExportedProgram) -> None:
    """constant_pad_nd(g, pads <= 0) -> one slice per cut dim, in place: a zero pad's gradient.

    ExecuTorch 1.5.1's constant_pad_nd refuses negative amounts and XNNPACK's
    pad takes none; cutting is what they mean, and XNNPACK slices.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.constant_pad_nd.default:
            continue
        grad, pads = node.args[0], list(cast(Sequence[int], node.args[1]))
        if not pads or any(p > 0 for p in pads) or not isinstance(grad, torch.fx.Node):
            continue
        value = grad.meta["val"]
        out = grad
        with graph.inserting_before(node):
            for k in range(len(pads) // 2):
                dim, before, after = value.dim() - 1 - k, -pads[2 * k], -pads[2 * k + 1]
                if before or after:
                    size = value.shape[dim]
                    out = graph.call_function(aten.slice.Tensor, (out, dim, before, size - after))
                    with value.fake_mode:
                        out.meta["val"] = aten.slice.Tensor(out.args[0].meta["val"], dim, before, size - after)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def _row_reduction_as_product(program: ExportedProgram, min_length: int = 1024) -> None:
    """mean / sum over a long last dim (>= min_length) as linear(t, row of 1/n or 1), in place.

    A norm's statistics (forward means, backward sums: every GroupNorm(1, C)
    reduces (B, 1, C*H*W) over its last dim) are portable loops; as a
    product by a constant row they run in XNNPACK's fully-connected kernel
    and keep the norm inside the delegate: ResNet step at width 1/4 -6%
    (ab runs side by side). Float sums reorder; the value agrees within
    rounding.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target not in (aten.mean.dim, aten.sum.dim_IntList) or node.kwargs.get("dtype") is not None:
            continue
        t, dims, *rest = node.args
        value = t.meta["val"]
        if value.dtype != torch.float32 or value.dim() < 2 or dims is None or not value.is_contiguous():
            continue
        if [d % value.dim() for d in dims] != [value.dim() - 1]:
            continue
        n = value.shape[-1]
        if n < min_length:
            continue
        scale = 1.0 / n if node.target is aten.mean.dim else 1.0
        with graph.inserting_before(node):
            flat = graph.call_function(aten.view.default, (t, [-1, n]))
            row = graph.call_function(
                aten.full.default, ([1, n], scale), {"dtype": torch.float32, "device": value.device}
            )
            prod = graph.call_function(aten.linear.default, (flat, row))
            shaped = graph.call_function(aten.view.default, (prod, list(node.meta["val"].shape)))
        with value.fake_mode:
            flat.meta["val"] = value.reshape(-1, n)
            row.meta["val"] = value.new_full([1, n], scale)
            prod.meta["val"] = torch.nn.functional.linear(flat.meta["val"], row.meta["val"])
            shaped.meta["val"] = prod.meta["val"].reshape(node.meta["val"].shape)
        node.replace_all_uses_with(shaped)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def _tie_mask_as_arithmetic(program: ExportedProgram) -> None:
    """amax's gradient mask (x == amax(x)) as 1 - ceil(clamp(amax(x) - x, 0, 1)), in place.

    amax(x) - x is >= 0, and 0 exactly where x is a maximum (IEEE subtraction
    of two different floats is never 0), so the float mask is the same as
    the boolean one. The boolean form costs three portable kernels over
    every pooling window (`eq`, the bool -> float copy for the product, the
    tie count's `sum` of booleans), ~20% of a CNN step; sub, clamp, ceil,
    mul and add run in XNNPACK, and the count sums floats.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is not aten.eq.Tensor or len(node.args) != 2:
            continue
        peak, x = cast(tuple[Any, Any], node.args)
        value, top = x.meta["val"], peak.meta["val"]
        source = _source(peak, through=(aten.alias.default, aten.view.default))
        if not (
            isinstance(source, torch.fx.Node)
            and source.target is aten.amax.default
            and source.args[0] is x
            and list(cast(Sequence[int], source.args[1])) in ([-1], [value.dim() - 1])
            and all(user.target in (aten.sum.dim_IntList, aten.mul.Tensor) for user in node.users)
        ):
            continue
        with graph.inserting_before(node):
            gap = graph.call_function(aten.sub.Tensor, (peak, x))
            clamped = graph.call_function(aten.clamp.default, (gap, 0.0, 1.0))
            step = graph.call_function(aten.ceil.default, (clamped,))
            negated = graph.call_function(aten.mul.Tensor, (step, -1.0))
            mask = graph.call_function(aten.add.Tensor, (negated, 1.0))
        with value.fake_mode:
            gap.meta["val"] = aten.sub.Tensor(top, value)
            clamped.meta["val"] = aten.clamp.default(gap.meta["val"], 0.0, 1.0)
            step.meta["val"] = aten.ceil.default(clamped.meta["val"])
            negated.meta["val"] = aten.mul.Tensor(step.meta["val"], -1.0)
            mask.meta["val"] = aten.add.Tensor(negated.meta["val"], 1.0)
        for user in list(node.users):
            user.replace_input_with(node, mask)
            if user.target is aten.sum.dim_IntList:
                with value.fake_mode:
                    user.meta["val"] = aten.sum.dim_IntList(mask.meta["val"], *user.args[1:])
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def _max_pool2d_as_amax(
    x: torch.Tensor,
    kernel_size: Sequence[int] | int,
    stride: Sequence[int] | int = (),
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    ceil_mode: bool = False,
) -> Any:
    """max_pool2d with kernel == stride, no padding: each window's taps moved last, then amax over them.

    (B, C, H, W) -> (B, C, H//k, k, W//k, k) -> permute -> (B, C, H//k, W//k, k*k) -> amax(-1): the
    permute is one XNNPACK transpose, and amax over the contiguous last dim is 3-4x faster in the
    portable kernel than over dims (3, 5) of the strided view.
    """
    kernel = _pair(kernel_size)
    strides = _pair(stride) if stride else kernel
    if strides != kernel or _pair(padding) != (0, 0) or _pair(dilation) != (1, 1) or ceil_mode:
        return NotImplemented  # keep the stock op; validation checks its gradient
    batch, channels, height, width = x.shape
    kh, kw = kernel
    rows, cols = height // kh, width // kw
    windows = x[:, :, : rows * kh, : cols * kw].reshape(batch, channels, rows, kh, cols, kw)
    return windows.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, rows, cols, kh * kw).amax(dim=-1)


def _after_autograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int] | int,
    padding: Sequence[int] | int | str,
    dilation: Sequence[int] | int,
    groups: int,
) -> bool:
    """Whether a convolution is decomposed in the joint graph: a 2-D, ungrouped, undilated one with stride 1
    and padding <= kernel - 1 (what `_convolution_backward_as_matmul` takes). One test for the three
    decompositions, so a convolution left whole before autograd is always decomposed after it.
    """
    if isinstance(padding, str) or groups != 1 or x.dim() != 4 or _pair(dilation) != (1, 1):
        return False
    (ph, pw), (kh, kw) = _pair(padding), _pair(weight.shape[2:])
    return _pair(stride) == (1, 1) and ph <= kh - 1 and pw <= kw - 1


def _conv2d_before_autograd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
) -> Any:
    """A strided conv2d as im2col before autograd; a unit-stride one stays a convolution until after it.

    Autograd writes an im2col convolution's input gradient as col2im: the
    patches' gradient cut into its taps, each zero-padded back to the
    input's place, summed (a ResNet step spent 28 ms in those pads at width
    1). A unit-stride convolution's input gradient is itself a unit-stride
    convolution of the output gradient, so it stays `aten.convolution` here,
    and its `convolution_backward` in the joint graph becomes im2col of the
    output gradient (`_convolution_backward_as_matmul`).
    """
    if _after_autograd(x, weight, stride, padding, dilation, groups):
        return NotImplemented
    return _conv2d_as_matmul(x, weight, bias, stride, padding, dilation, groups)


# From this many channels on, a unit-stride convolution's patches are channels-last (`_patches_last`).
_CHANNELS_LAST_MIN = 32


def _convolution_as_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> Any:
    """aten.convolution (a unit-stride conv2d, in the joint graph) as im2col and one product, contiguous.

    With >= `_CHANNELS_LAST_MIN` input channels the patches are channels-last, (B, rows, cols, kh*kw*C),
    and the product linear(patches, weight): XNNPACK packs the product's second operand on every call,
    and here that is the weight, not the 9x-input patches (ResNet step at width 1 -5%, ab). With
    fewer channels each tap's chunk of a patch row is too short for the cat (ResNet at width 1/4
    +13% channels-last), so they stay channels-first (`_conv2d_as_matmul`).
    Contiguous because the joint graph already views the convolution's output as the stock op lays it
    out (a permuted result cannot be viewed); the clone and the permute then become one copy
    (`_contiguous_permute_as_copy`).
    """
    if transposed or not _after_autograd(x, weight, stride, padding, dilation, groups):
        return NotImplemented
    out_channels, channels, kh, kw = weight.shape
    if channels < _CHANNELS_LAST_MIN:
        return _conv2d_as_matmul(x, weight, bias, stride, padding).contiguous()
    patches = _patches_last(x.permute(0, 2, 3, 1), (kh, kw), _pair(padding))
    out = F.linear(patches, weight.permute(0, 2, 3, 1).reshape(out_channels, kh * kw * channels), bias)
    return out.permute(0, 3, 1, 2).contiguous()


def _convolution_backward_as_matmul(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> Any:
    """A unit-stride convolution's gradients as products, its input gradient by im2col of `grad`.

    With stride 1, dx[c, y, x] = sum over (o, i, j) of grad[o, y + p - i, x + p - j] * w[o, c, i, j]:
    `grad` zero-padded by k - 1 - p, its taps read in reverse order, times w with its two channel
    axes swapped. That is one pad, one slice per tap and a cat over the output gradient, where
    autograd's col2im padded every tap's gradient to the input's size and summed them (ResNet step
    at width 1 -6 to -19%, ab). The weight gradient is grad (O, N) @ patches, over the forward's
    patches (recomputed here, in the forward's layout; `_merge_duplicates` makes them the forward's).
    Patches of >= `_CHANNELS_LAST_MIN` channels are channels-last, as in `_convolution_as_matmul`.
    """
    if transposed or not _after_autograd(x, weight, stride, padding, dilation, groups):
        return NotImplemented
    (ph, pw), (kh, kw) = _pair(padding), _pair(weight.shape[2:])
    out_channels, channels = weight.shape[:2]
    batch, _, rows, cols = grad.shape
    grad_input = grad_weight = grad_bias = None
    flipped = (kh - 1 - ph, kw - 1 - pw)
    if output_mask[0] and out_channels >= _CHANNELS_LAST_MIN:
        patches = _patches_last(grad.permute(0, 2, 3, 1), (kh, kw), flipped, reverse=True)
        by_tap = weight.permute(1, 2, 3, 0).reshape(channels, kh * kw * out_channels)  # (C, kh, kw, O)
        grad_input = F.linear(patches, by_tap).permute(0, 3, 1, 2).contiguous()
    elif output_mask[0]:
        patches = _patches(grad.permute(1, 0, 2, 3), (kh, kw), flipped, reverse=True)
        columns = torch.mm(weight.permute(1, 0, 2, 3).reshape(channels, out_channels * kh * kw), patches)
        grad_input = columns.reshape(channels, batch, x.shape[2], x.shape[3]).permute(1, 0, 2, 3).contiguous()
    if output_mask[1]:
        by_channel = grad.permute(1, 0, 2, 3).reshape(out_channels, batch * rows * cols)
        if channels >= _CHANNELS_LAST_MIN:
            patches = _patches_last(x.permute(0, 2, 3, 1), (kh, kw), (ph, pw))
            product = torch.mm(by_channel, patches.reshape(batch * rows * cols, kh * kw * channels))
            grad_weight = product.reshape(out_channels, kh, kw, channels).permute(0, 3, 1, 2).contiguous()
        else:
            patches = _patches(x.permute(1, 0, 2, 3), (kh, kw), (ph, pw))
            grad_weight = torch.mm(by_channel, patches.t()).reshape(weight.shape)
    if output_mask[2]:
        grad_bias = grad.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_bias


def _patches(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], *, reverse: bool = False) -> Any:
    """A unit-stride convolution's im2col matrix (C*kh*kw, B*rows*cols) of the channels-first (C, B, H, W) `x`.

    One zero pad, each row cut once and shared by its kw taps, one cat: rows in the weight's (C, kh, kw)
    order, or with `reverse` the taps read from the last offset back (an input gradient's flipped kernel).
    """
    taps = _taps(x, 2, kernel, padding, reverse)
    channels, batch, rows, cols = taps[0].shape
    # (C, kh*kw*B, rows, cols), laid out as (C, kh*kw, B, rows, cols) -> (C*kh*kw, B*rows*cols). A cat,
    # not a stack: a stack is a cat and a view, and the delegate copies every view it cannot elide.
    return torch.cat(taps, dim=1).reshape(channels * len(taps), batch * rows * cols)


def _patches_last(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], *, reverse: bool = False) -> Any:
    """`_patches` of the channels-last (B, H, W, C) `x`: (B, rows, cols, kh*kw*C), columns in (kh, kw, C) order."""
    return torch.cat(_taps(x, 1, kernel, padding, reverse), dim=-1)


def _taps(
    x: torch.Tensor,
    dim: int,
    kernel: tuple[int, int],
    padding: tuple[int, int],
    reverse: bool,
) -> list[torch.Tensor]:
    """The kh*kw unit-stride taps of `x` over its spatial dims (`dim`, `dim` + 1), after one zero pad.

    Each row cut once and shared by its kw taps; with `reverse`, read from the last offset back.
    The pad is constant_pad_nd, not F.pad: in the joint graph F.pad stays aten.pad, which
    `_merge_duplicates` does not merge.
    """
    (kh, kw), (ph, pw) = kernel, padding
    rows, cols = x.shape[dim] + 2 * ph - kh + 1, x.shape[dim + 1] + 2 * pw - kw + 1
    if ph or pw:
        x = torch.constant_pad_nd(x, [0, 0] * (x.dim() - 2 - dim) + [pw, pw, ph, ph], 0.0)
    order_h = range(kh - 1, -1, -1) if reverse else range(kh)
    order_w = range(kw - 1, -1, -1) if reverse else range(kw)
    bands = {i: _window(x, dim, i, rows) for i in order_h}
    return [_window(bands[i], dim + 1, j, cols) for i in order_h for j in order_w]


def _merge_duplicates(program: ExportedProgram) -> None:
    """Merge the joint graph's repeated data-movement ops (same op, same inputs) into the first, in place.

    `_convolution_backward_as_matmul` recomputes each convolution's patches from its input (seen
    through the joint graph's `alias` of a saved activation) for the weight gradient; the forward
    computed the same ones, and no pass downstream merges them.
    """
    graph = program.graph_module.graph
    aten = torch.ops.aten
    pure = {
        aten.permute.default,
        aten.constant_pad_nd.default,
        aten.slice.Tensor,
        aten.cat.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.clone.default,
    }  # not alias: `key` looks through it
    seen: dict[Any, torch.fx.Node] = {}

    def key(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return ("node", _source(value).name)
        if isinstance(value, (list, tuple)):
            return tuple(key(v) for v in value)
        return repr(value)

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in pure:
            continue
        signature = (node.target, key(node.args), key(sorted(node.kwargs.items())))
        first = seen.setdefault(signature, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def _conv2d_as_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
) -> Any:
    """conv2d as im2col over (C, B, H, W) (one zero pad, unit-stride slices per tap, a cat) and one mm.

    The input is moved channels-first once, so the patches come out as (C*kh*kw, B*rows*cols) without
    a copy beyond the cat, and one `mm` by the (O, C*kh*kw) weight gives (O, B, rows, cols), moved
    back once. Both moves are XNNPACK transposes; the weight's gradient is then one matrix product
    too, where a batched product needed the weight expanded per sample and its gradient summed back.
    """
    if groups != 1 or x.dim() != 4 or _pair(dilation) != (1, 1) or isinstance(padding, str):
        return NotImplemented  # keep the stock op; validation checks it
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    rows, cols = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    x = x.permute(1, 0, 2, 3)  # (C, B, H, W)
    if (sh, sw) == (1, 1):
        patches = _patches(x, (kh, kw), (ph, pw))
    else:
        # A strided conv's input is cut into whole stride blocks (`_strided_taps`): zero rows and
        # columns past the last tap, which reads row (kh - 1) + sh * (rows - 1) < height + 2 * ph.
        # One zero pad; its gradient, a pad by negative amounts (which ExecuTorch 1.5.1's
        # constant_pad_nd refuses), becomes slices (`_negative_pad_as_slices`).
        extra_h, extra_w = -(height + 2 * ph) % sh, -(width + 2 * pw) % sw
        if ph or pw or extra_h or extra_w:
            x = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h))
        taps = _strided_taps(x, (kh, kw), (sh, sw), (rows, cols))
        patches = torch.cat(taps, dim=1).reshape(channels * kh * kw, batch * rows * cols)
    out = torch.mm(weight.reshape(out_channels, channels * kh * kw), patches)
    out = out.reshape(out_channels, batch, rows, cols).permute(1, 0, 2, 3)
    return out if bias is None else out + bias.reshape(1, out_channels, 1, 1)


def _strided_taps(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], out: tuple[int, int]) -> Any:
    """The taps of a strided convolution over the padded (C, B, H, W) input (whole blocks), by space-to-depth.

    A strided slice is a portable kernel (and its gradient a portable
    slice_scatter into zeros): ~10% of a ResNet step at width 1, ~25% at
    1/4. Tap (i, j) reads rows i, i + sh, ... = rows i // sh + r of phase
    i % sh, so the input, cut to whole stride blocks, is reshaped to
    (C, B, H/sh, sh, W/sw, sw) and its phases moved first (one XNNPACK
    transpose); each phase plane is then a contiguous slice and each tap
    two unit-stride slices of its plane, all XNNPACK ops, and their
    gradients pads and adds.
    """
    (kh, kw), (sh, sw), (rows, cols) = kernel, stride, out
    channels, batch, height, width = x.shape
    blocks_h, blocks_w = height // sh, width // sw
    phases = x.reshape(channels, batch, blocks_h, sh, blocks_w, sw).permute(3, 5, 0, 1, 2, 4)
    planes = phases.reshape(sh * sw * channels, batch, blocks_h, blocks_w)  # phase (p, q): rows (p*sw + q)*C...
    bands = {  # each (phase row, row cut) once, shared by its taps
        (i % sh, j % sw, i // sh): _window(
            _window(planes, 0, ((i % sh) * sw + j % sw) * channels, channels), 2, i // sh, rows
        )
        for i in range(kh)
        for j in range(kw)
    }
    return [_window(bands[i % sh, j % sw, i // sh], 3, j // sw, cols) for i in range(kh) for j in range(kw)]


def _window(t: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """t[..., start : start + length, ...] along `dim`; no slice at all where that is the whole dim."""
    return t if start == 0 and length == t.shape[dim] else t.narrow(dim, start, length)


def _linear_as_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """linear as mm + add: ExecuTorch's portable addmm, what linear lowers to, is a naive loop."""
    out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _pair(value: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])
