"""The ExecuTorch exporter's rewrites: same function, no convolution kernel left, matrix products in XNNPACK."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msfusion.edge_runtime.backends.executorch import (
    PROGRAM,
    REFERENCE_PATCHES,
    REFERENCES,
    ExecuTorchBackend,
    ReferencePatch,
    ReferencePatches,
)
from msfusion.errors import ArtifactError
from msfusion.export.cache import CachedArtifact
from msfusion.export.executorch import (
    _CHANNELS_LAST_MIN,
    _broadcast_instead_of_expand,
    _contiguous_permute_as_copy,
    _conv2d_as_matmul,
    _convolution_as_matmul,
    _convolution_backward_as_matmul,
    _max_pool2d_as_amax,
    _merge_duplicates,
    _negative_pad_as_slices,
    _pool_before_relu,
    _relu_backward_as_mul,
    _row_reduction_as_product,
    _scatter_into_zeros_as_pad,
    _sum_trailing_first,
    _tie_mask_as_arithmetic,
    _transposed_product_as_linear,
    export_references,
    export_submodel,
    loss_program,
)
from msfusion.export.objective import random_batch
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.wire.artifacts import ArtifactKind, TensorInfo


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "bias"),
    [
        (3, 1, 1, True),
        (3, 2, 1, True),
        (3, 1, 0, False),
        (1, 1, 0, True),
        (1, 2, 0, False),
        (5, 2, 2, True),
        (3, 3, 1, False),  # blocks of 3: zero rows and columns added past the last tap
        (2, 2, 0, True),
        ((3, 1), (2, 1), (1, 0), False),  # strided in one dim only
    ],
)
def test_conv2d_as_matmul_equals_conv2d_and_its_gradients(kernel: Any, stride: Any, padding: Any, bias: bool) -> None:
    gen = torch.Generator().manual_seed(hash((kernel, stride, padding)) % 1000)
    x = torch.randn(3, 4, 9, 11, generator=gen, requires_grad=True)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    weight = torch.randn(5, 4, kh, kw, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True) if bias else None
    got = _conv2d_as_matmul(x, weight, b, stride, padding)
    want = F.conv2d(x, weight, b, stride, padding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(want.shape, generator=gen)
    inputs = [x, weight] + ([b] if b is not None else [])
    got_grads = torch.autograd.grad(got, inputs, grad)
    want_grads = torch.autograd.grad(want, inputs, grad)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels", [3, _CHANNELS_LAST_MIN])  # channels-first and channels-last patches
@pytest.mark.parametrize(
    ("kernel", "padding", "bias"), [(3, 1, True), (3, 0, False), (1, 0, True), ((3, 5), (2, 1), False)]
)
def test_a_unit_stride_convolution_and_its_backward_as_products_equal_the_stock_ops(
    channels: int, kernel: Any, padding: Any, bias: bool
) -> None:
    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(channels)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pads = [padding, padding] if isinstance(padding, int) else list(padding)
    x = torch.randn(2, channels, 7, 9, generator=gen)
    weight = torch.randn(channels + 1, channels, kh, kw, generator=gen)
    b = torch.randn(channels + 1, generator=gen) if bias else None
    conv_args = ([1, 1], pads, [1, 1], False, [0, 0], 1)
    want = aten.convolution.default(x, weight, b, *conv_args)
    got = _convolution_as_matmul(x, weight, b, *conv_args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got.is_contiguous()  # the joint graph views it as the stock op lays it out
    grad = torch.randn(want.shape, generator=gen)
    mask = [True, True, bias]
    want_grads = aten.convolution_backward.default(grad, x, weight, [channels + 1] if bias else None, *conv_args, mask)
    got_grads = _convolution_backward_as_matmul(grad, x, weight, None, *conv_args, mask)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)
    assert _convolution_backward_as_matmul(grad, x, weight, None, *conv_args, [False, True, False])[0] is None


def test_a_strided_convolution_backward_is_left_to_autograd() -> None:
    x, weight = torch.zeros(1, 4, 8, 8), torch.zeros(4, 4, 3, 3)
    strided = ([2, 2], [1, 1], [1, 1], False, [0, 0], 1)
    assert _convolution_as_matmul(x, weight, None, *strided) is NotImplemented
    assert _convolution_backward_as_matmul(torch.zeros(1, 4, 4, 4), x, weight, None, *strided, [True] * 3) is (
        NotImplemented
    )


def test_the_weight_gradient_reads_the_forward_patches_once_merged() -> None:
    class ConvLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(_CHANNELS_LAST_MIN, 4, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.conv(x).square().sum(),)

    torch.manual_seed(9)
    # The input takes no gradient: only the weight's, over the forward's patches.
    joint, args = _joint(ConvLoss(), torch.randn(2, _CHANNELS_LAST_MIN, 5, 5))
    joint = joint.run_decompositions(
        {
            torch.ops.aten.convolution.default: _convolution_as_matmul,
            torch.ops.aten.convolution_backward.default: _convolution_backward_as_matmul,
        }
    )
    want = joint.graph_module(*args)
    assert _ops(joint).count(torch.ops.aten.cat.default) == 2  # the forward's patches, and their recomputation
    _merge_duplicates(joint)
    assert _ops(joint).count(torch.ops.aten.cat.default) == 1
    for g, w in zip(joint.graph_module(*args), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_unsupported_convolutions_keep_the_stock_op() -> None:
    x, weight = torch.zeros(1, 4, 8, 8), torch.zeros(4, 2, 3, 3)
    assert _conv2d_as_matmul(x, weight, None, 1, 1, 1, 2) is NotImplemented  # grouped
    assert _conv2d_as_matmul(x, torch.zeros(4, 4, 3, 3), None, 1, 1, 2) is NotImplemented  # dilated


def test_the_exported_cnn_program_has_no_convolution_kernel(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="cnn", channels=(4, 8, 8))
    export_submodel(cfg, None, LossConfig(ContrastiveVariant.OFF), tmp_path, batch_size=2)
    program = (tmp_path / PROGRAM).read_bytes()
    assert b"XnnpackBackend" in program
    assert b"aten::convolution" not in program  # neither the forward nor convolution_backward
    assert b"aten::mm" not in program and b"aten::bmm" not in program  # every matrix product delegated


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 9, 7)])
def test_max_pool2d_as_amax_equals_max_pool2d_after_a_relu_and_its_gradient(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=gen).relu().requires_grad_()  # ties only at zero, as in our models
    got, want = _max_pool2d_as_amax(x, 2), F.max_pool2d(x, 2)
    torch.testing.assert_close(got, want)
    grad = torch.randn(want.shape, generator=gen)
    (got_grad,) = torch.autograd.grad(got.relu(), [x], grad)
    (want_grad,) = torch.autograd.grad(want.relu(), [x], grad)
    torch.testing.assert_close(got_grad * (x > 0), want_grad * (x > 0))
    assert _max_pool2d_as_amax(x, 3, 2) is NotImplemented  # overlapping windows keep the stock op


@pytest.mark.parametrize(("shape", "bias"), [((6, 5), True), ((2, 3, 5), True), ((2, 3, 5), False)])
def test_linear_as_mm_equals_linear_and_its_gradients(shape: tuple[int, ...], bias: bool) -> None:
    from msfusion.export.executorch import _linear_as_mm

    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    weight = torch.randn(4, 5, generator=gen, requires_grad=True)
    b = torch.randn(4, generator=gen, requires_grad=True) if bias else None
    got, want = _linear_as_mm(x, weight, b), F.linear(x, weight, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inputs = [x, weight] + ([b] if b is not None else [])
    grad = torch.randn(want.shape, generator=gen)
    for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_the_exported_charlm_program_has_no_addmm_kernel(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="charlm", d_model=16, n_heads=2, head_dim=8, d_ff=32, n_layers=1, context=8)
    export_submodel(cfg, None, LossConfig(ContrastiveVariant.OFF), tmp_path, optimizer="adamw", batch_size=2)
    program = (tmp_path / PROGRAM).read_bytes()
    assert b"XnnpackBackend" in program
    assert b"aten::addmm" not in program and b"aten::linear" not in program
    assert b"aten::mm" not in program  # every matrix product delegated


class _ConvReluPool(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv(x)), 2).sum(dim=(2, 3))


def _ops(program: torch.export.ExportedProgram) -> list[Any]:
    return [node.target for node in program.graph.nodes if node.op == "call_function"]


def test_pool_before_relu_is_the_same_function_and_gradient() -> None:
    torch.manual_seed(0)
    module = _ConvReluPool()
    x = torch.randn(2, 2, 8, 8)
    program = _pool_before_relu(torch.export.export(module, (x,)))
    ops = _ops(program)
    relu, pool = torch.ops.aten.relu.default, torch.ops.aten.max_pool2d.default
    assert ops.index(pool) < ops.index(relu)  # rewritten: the ReLU runs on the pooled tensor
    rewritten = program.module()
    torch.testing.assert_close(rewritten(x), module(x))
    got = torch.autograd.grad(rewritten(x).square().sum(), list(rewritten.parameters()))
    want = torch.autograd.grad(module(x).square().sum(), list(module.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_relu_with_other_users_keeps_its_place() -> None:
    class Both(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(x)
            return F.max_pool2d(y, 2).sum() + y.sum()

    program = _pool_before_relu(torch.export.export(Both(), (torch.randn(1, 1, 4, 4),)))
    ops = _ops(program)
    assert ops.index(torch.ops.aten.relu.default) < ops.index(torch.ops.aten.max_pool2d.default)


def _joint(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
    """module's joint (loss, gradients) graph, as the exporter makes it, and the arguments to run it."""
    from torch.export.experimental import _export_forward_backward

    from msfusion.models.layers import traceable_norms

    with traceable_norms():
        program = torch.export.export(module, inputs)
    joint = _export_forward_backward(program)
    return joint, [*(joint.state_dict[name] for name in joint.graph_signature.parameters), *inputs]


def _rewritten_the_same(joint: Any, args: list[torch.Tensor], rewrite: Any) -> None:
    want = joint.graph_module(*args)
    rewrite(joint)
    got = joint.graph_module(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same values, not merely close


class _Loss(torch.nn.Module):
    def __init__(self, shape: tuple[int, ...], loss: Any) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(*shape))
        self.loss = loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.loss(self.weight, x),)


def test_broadcast_instead_of_expand_keeps_the_loss_and_gradients() -> None:
    from msfusion.models.layers import GroupNorm

    class NormLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = GroupNorm(1, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return ((self.norm(x) * x).mean(),)

    torch.manual_seed(1)
    module = NormLoss()
    with torch.no_grad():
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.uniform_(-0.5, 0.5)
    joint, args = _joint(module, torch.randn(2, 3, 4, 4))
    assert torch.ops.aten.expand.default in _ops(joint)
    want = joint.graph_module(*args)
    _broadcast_instead_of_expand(joint)
    assert torch.ops.aten.expand.default not in _ops(joint)  # every mean's expand became a broadcast
    for g, w in zip(joint.graph_module(*args), want, strict=True):
        torch.testing.assert_close(g, w)  # the division moved before the broadcast: rounding may differ


def test_relu_backward_as_mul_is_the_same_gradient() -> None:
    torch.manual_seed(2)
    module = _Loss((3, 5), lambda w, x: (torch.relu(w * x) * x).sum())
    x = torch.randn(3, 5)
    x[0, :2] = 0.0  # ReLU inputs of exactly 0: the gradient is 0 there in both forms
    joint, args = _joint(module, x)
    assert torch.ops.aten.where.self in _ops(joint)
    _rewritten_the_same(joint, args, _relu_backward_as_mul)
    assert torch.ops.aten.where.self not in _ops(joint) and torch.ops.aten.ceil.default in _ops(joint)


def test_scatter_into_zeros_as_pad_is_the_same_gradient() -> None:
    torch.manual_seed(3)
    unit = _Loss((2, 3, 6, 7), lambda w, x: (w[:, :, 1:4, 2:6] * x).square().sum())
    joint, args = _joint(unit, torch.randn(2, 3, 3, 4))
    assert torch.ops.aten.slice_scatter.default in _ops(joint)
    _rewritten_the_same(joint, args, _scatter_into_zeros_as_pad)
    ops = _ops(joint)
    assert torch.ops.aten.slice_scatter.default not in ops
    assert ops.count(torch.ops.aten.constant_pad_nd.default) == 1  # both cuts' gradients as one pad

    strided = _Loss((2, 3, 6, 7), lambda w, x: (w[:, :, ::2, :] * x).square().sum())
    joint, args = _joint(strided, torch.randn(2, 3, 3, 7))
    _rewritten_the_same(joint, args, _scatter_into_zeros_as_pad)
    assert torch.ops.aten.slice_scatter.default in _ops(joint)  # a strided cut keeps its scatter


def test_tie_mask_as_arithmetic_is_the_same_gradient() -> None:
    torch.manual_seed(4)
    module = _Loss((3, 4, 4), lambda w, x: (w.amax(dim=-1) * x).sum())
    with torch.no_grad():
        module.weight[0, 0] = torch.tensor([1.0, 2.0, 2.0, 0.5])  # a tie: the gradient splits in half
        module.weight[1, 1] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # in quarters
        module.weight[2, 2] = torch.tensor([1.0, 1.0 + 2**-20, 0.0, 1.0])  # a near tie: no split
    joint, args = _joint(module, torch.randn(3, 4))
    assert torch.ops.aten.eq.Tensor in _ops(joint)
    _rewritten_the_same(joint, args, _tie_mask_as_arithmetic)
    assert torch.ops.aten.eq.Tensor not in _ops(joint)


def test_strided_convolutions_leave_no_strided_slice() -> None:
    class Strided(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (_conv2d_as_matmul(x, self.weight, None, 2, 1).square().mean(),)

    joint, _ = _joint(Strided(), torch.randn(2, 3, 9, 9))
    slices = [n for n in joint.graph_module.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert slices and all(len(n.args) < 5 or n.args[4] == 1 for n in slices)  # phase planes, unit steps
    assert torch.ops.aten.slice_scatter.default not in _ops(joint)


def test_negative_pad_as_slices_is_the_same_gradient() -> None:
    torch.manual_seed(5)
    module = _Loss((2, 3, 4, 5), lambda w, x: (F.pad(w, (1, 2, 3, 0)) * x).square().sum())
    joint, args = _joint(module, torch.randn(2, 3, 7, 8))
    assert torch.ops.aten.constant_pad_nd.default in _ops(joint)
    _rewritten_the_same(joint, args, _negative_pad_as_slices)
    pads = [n for n in joint.graph_module.graph.nodes if n.target is torch.ops.aten.constant_pad_nd.default]
    assert pads and all(all(p >= 0 for p in n.args[1]) for n in pads)  # the forward pad stays, the cut went


def test_sum_trailing_first_agrees_within_rounding() -> None:
    torch.manual_seed(6)
    module = _Loss((1, 5, 1, 1), lambda w, x: (w * x).square().sum())  # weight grad: sum over (0, 2, 3)
    joint, args = _joint(module, torch.randn(3, 5, 6, 7))
    want = joint.graph_module(*args)
    _sum_trailing_first(joint)
    for g, w in zip(joint.graph_module(*args), want, strict=True):
        torch.testing.assert_close(g, w)
    sums = [n for n in joint.graph_module.graph.nodes if n.target is torch.ops.aten.sum.dim_IntList]
    assert [0, 2, 3] not in [list(n.args[1] or []) for n in sums]  # the trailing dims first, then the batch
    assert [-1] in [list(n.args[1] or []) for n in sums]


def test_transposed_product_as_linear_is_the_same_product() -> None:
    torch.manual_seed(7)
    module = _Loss((6, 5), lambda w, x: torch.mm(w, x).square().sum())  # w's grad: g @ x.t()
    joint, args = _joint(module, torch.randn(5, 4))
    _rewritten_the_same(joint, args, _transposed_product_as_linear)
    assert torch.ops.aten.linear.default in _ops(joint)


def test_contiguous_permute_as_copy_is_the_same_tensor() -> None:
    torch.manual_seed(8)
    module = _Loss((2, 3, 4), lambda w, x: (w.permute(1, 0, 2).reshape(3, 8) * x).square().sum())
    joint, args = _joint(module, torch.randn(3, 8))
    assert torch.ops.aten.clone.default in _ops(joint)
    _rewritten_the_same(joint, args, _contiguous_permute_as_copy)
    ops = _ops(joint)
    assert torch.ops.aten.clone.default not in ops and torch.ops.aten.permute_copy.default in ops


def test_row_reduction_as_product_agrees_within_rounding() -> None:
    from msfusion.models.layers import GroupNorm

    class NormLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = GroupNorm(1, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return ((self.norm(x) * x).square().mean(),)

    torch.manual_seed(9)
    joint, args = _joint(NormLoss(), torch.randn(2, 4, 8, 8) * 3 + 1)
    want = joint.graph_module(*args)
    _row_reduction_as_product(joint, min_length=64)
    assert torch.ops.aten.linear.default in _ops(joint)
    assert torch.ops.aten.mean.dim not in _ops(joint)  # both statistics of the 256-long rows
    for g, w in zip(joint.graph_module(*args), want, strict=True):
        torch.testing.assert_close(g, w)


def test_a_cnn_on_images_with_a_constant_background_tracks_the_reference(tmp_path: Path) -> None:
    """Tied maxima (a window of equal values, as a blank background gives) keep the reference's gradients.

    The program pools before the ReLU and splits a tie evenly, where torch's max_pool2d gives it all
    to the first maximum: equal values come from equal inputs, whose weight gradients are the same.
    """
    from msfusion.export.validate import validate_artifact

    cfg = ModelConfig(arch="cnn", channels=(4, 8, 8))
    loss = LossConfig(ContrastiveVariant.OFF)
    export_submodel(cfg, None, loss, tmp_path, batch_size=4)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        x = torch.zeros(4, cfg.in_channels, cfg.image_size, cfg.image_size)
        x[:, :, 8:20, 6:22] = torch.rand(4, cfg.in_channels, 12, 16, generator=gen)  # the rest is background
        y = torch.randint(0, cfg.num_classes, (4,), generator=gen)
        batches.append((x.numpy(), y.numpy()))
    report = validate_artifact(tmp_path, cfg, None, loss, batches=batches)
    assert report.max_weight_error < 1e-4


# ---------------------------------------------------------------- the references program


def test_the_references_run_apart_in_an_xnnpack_program_with_every_weight_located(
    exported: Callable[..., CachedArtifact],
) -> None:
    # Prepare
    artifact = exported(ArtifactKind.EXECUTORCH)
    # Execute
    patches = ReferencePatches.from_json((artifact.path / REFERENCE_PATCHES).read_bytes())
    program = (artifact.path / REFERENCES).read_bytes()
    # Assert: native convolutions in XNNPACK, and both references' body (all but the unused head) patched
    assert b"XnnpackBackend" in program
    assert b"aten::convolution" not in program
    assert [info.name for info in patches.outputs] == ["z_glob", "z_prev"]
    located = {patch.tensor for patch in patches.patches}
    body = {info.name for info in artifact.manifest.frozen if ".blocks." in info.name}
    assert body and body <= located
    assert {patch.permute for patch in patches.patches if patch.tensor.endswith("conv.weight")} >= {(0, 2, 3, 1)}


def test_a_layout_the_table_does_not_know_fails_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the table may only find tensors stored as they are, not a convolution's OHWI
    import msfusion.export.executorch as exporter

    cfg = ModelConfig(arch="cnn", channels=(4, 8, 8), image_size=16)
    graph = loss_program(cfg, None, LossConfig(ContrastiveVariant.POSITIVE, mu=1.0, tau=0.5), 2, references_apart=True)
    assert graph.references is not None
    monkeypatch.setattr(exporter, "_LAYOUTS", {})
    # Execute / Assert
    with pytest.raises(ArtifactError, match="layout the table does not know"):
        x, _ = random_batch(cfg, 2, np.random.default_rng(0))
        export_references(graph.references, graph.frozen, torch.from_numpy(x), seed=0)


def test_the_patch_table_round_trips_and_refuses_what_it_cannot_write() -> None:
    # Prepare
    table = ReferencePatches(
        outputs=(TensorInfo("z_glob", (2, 3)),),
        patches=(ReferencePatch("w", 4, (1, 0)),),
    )
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    # Execute
    again = ReferencePatches.from_json(table.to_json())
    patched = again.apply(bytes(32), weights)
    # Assert
    assert again == table
    np.testing.assert_array_equal(np.frombuffer(bytes(patched[4:28]), "<f4"), weights["w"].T.ravel())
    assert patched[:4] == bytes(4) and patched[28:] == bytes(4)
    with pytest.raises(ArtifactError, match="outside"):
        table.apply(bytes(16), weights)
    with pytest.raises(ArtifactError, match="lack"):
        table.apply(bytes(32), {})
    with pytest.raises(ArtifactError, match="permutation"):
        table.apply(bytes(32), {"w": np.zeros(6, np.float32)})
    with pytest.raises(ArtifactError, match="malformed"):
        ReferencePatches.from_json(json.dumps({"outputs": [], "patches": [{"tensor": "w"}]}))


def test_a_model_without_convolutions_keeps_its_references_in_the_training_program() -> None:
    # Prepare
    cfg = ModelConfig(arch="charlm", d_model=16, n_heads=2, head_dim=8, d_ff=32, n_layers=1, context=8)
    moon = LossConfig(ContrastiveVariant.MOON, mu=0.5, tau=0.5)
    # Execute
    graph = loss_program(cfg, None, moon, 2, references_apart=True)
    # Assert: the weights of both references are the program's inputs after (x, y)
    assert graph.references is None
    inputs = [spec for spec in graph.program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    assert len(inputs) == 2 + len(graph.frozen) and graph.frozen


def test_a_references_program_without_its_table_is_refused_at_load(exported: Callable[..., CachedArtifact]) -> None:
    # Prepare: the manifest lists references.pte but not references.json
    artifact = exported(ArtifactKind.EXECUTORCH)
    files = tuple(entry for entry in artifact.manifest.files if entry.name != REFERENCE_PATCHES)
    manifest = replace(artifact.manifest, files=files)
    backend = ExecuTorchBackend()
    # Execute / Assert
    with pytest.raises(ArtifactError, match="no references.json"):
        backend.load(artifact.path, manifest)
    with pytest.raises(ArtifactError, match="load an artifact first"):
        backend.weights()
