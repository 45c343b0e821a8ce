"""The models: spec agrees with state_dict, slicing, the scaler, FLOP counts, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msfusion.algorithm.spec import ModelSpec, widths_for_ratio
from msfusion.errors import ConfigError
from msfusion.models.config import ModelConfig
from msfusion.models.layers import (
    GroupNorm,
    LayerNorm,
    scale_gradients,
    scaled_parameters,
)
from msfusion.models.registry import (
    build_model,
    flops_per_sample,
    load_numpy,
    model_spec,
    state_to_numpy,
)

# Small enough to run in milliseconds; every group size is divisible by 4.
SMALL = {
    "cnn": ModelConfig(arch="cnn", channels=(4, 8, 8), image_size=16),
    "resnet": ModelConfig(arch="resnet", channels=(4, 8, 8), image_size=16, blocks_per_stage=2),
    "charlm": ModelConfig(
        arch="charlm", vocab_size=11, d_model=8, n_heads=4, head_dim=3, d_ff=12, n_layers=2, context=10
    ),
}
ARCHS = sorted(SMALL)


def _inputs(cfg: ModelConfig, batch: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if cfg.task == "lm":
        return torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=gen)
    return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def _slice(weights: dict[str, np.ndarray], spec: ModelSpec, units: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in weights.items():
        t = torch.from_numpy(value)
        for axis, index in spec.tensor_index(name, units).items():
            t = torch.index_select(t, axis, torch.from_numpy(index))
        out[name] = t.numpy()
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_state_dict_names_and_shapes_equal_the_spec(arch: str, ratio: float) -> None:
    # Prepare
    cfg = ModelConfig(arch=arch)
    spec = model_spec(cfg)
    widths = widths_for_ratio(spec, ratio)
    # Execute
    model = build_model(cfg, widths, seed=0)
    state = model.state_dict()
    # Assert
    assert list(state) == list(spec.shapes)
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: spec.sub_shape(n, widths) for n in spec.shapes}
    assert set(state) == {n for n, _ in model.named_parameters()}  # buffers stay out of state_dict
    assert spec.param_count(widths) == sum(p.numel() for p in model.parameters())


def test_group_names_per_arch() -> None:
    assert [g.name for g in model_spec(ModelConfig(arch="cnn")).groups] == ["conv0", "conv1", "conv2"]
    assert [g.name for g in model_spec(ModelConfig(arch="resnet")).groups] == [
        "stage0",
        "stage1",
        "stage2",
        "stage0.block0",
        "stage1.block0",
        "stage2.block0",
    ]
    lm = model_spec(ModelConfig(arch="charlm"))
    assert [(g.name, g.size) for g in lm.groups] == [
        ("embed", 128),
        ("layer0.heads", 4),
        ("layer0.ffn", 512),
        ("layer1.heads", 4),
        ("layer1.ffn", 512),
    ]
    assert {ax.unit_size for ax in lm.group("layer0.heads").axes} == {32}


def test_resnet_residual_adds_share_one_group() -> None:
    spec = model_spec(SMALL["resnet"])
    stage1 = {(ax.tensor, ax.axis) for ax in spec.group("stage1").axes}
    # Both sides of every add in stage 1, and every reader of the stage-1 stream.
    assert {
        ("stages.1.0.shortcut.conv.weight", 0),
        ("stages.1.0.conv2.weight", 0),
        ("stages.1.1.conv2.weight", 0),
        ("stages.1.1.conv1.weight", 1),
        ("stages.2.0.conv1.weight", 1),
        ("stages.2.0.shortcut.conv.weight", 1),
    } <= stage1
    assert ("stages.1.1.conv1.weight", 0) in {(ax.tensor, ax.axis) for ax in spec.group("stage1.block1").axes}


@pytest.mark.parametrize("arch", ARCHS)
def test_full_window_sliced_at_any_start_gives_identical_outputs(arch: str) -> None:
    # Prepare: every group's window holds all K units, rotated by a different start.
    cfg = SMALL[arch]
    spec = model_spec(cfg)
    full = build_model(cfg, seed=0).eval()
    units = {g.name: np.roll(np.arange(g.size), -(i + 1)) for i, g in enumerate(spec.groups)}
    rotated = build_model(cfg, spec.group_sizes, seed=1).eval()
    x = _inputs(cfg)
    # Execute
    load_numpy(rotated, _slice(state_to_numpy(full), spec, units))
    with torch.no_grad():
        logits, z = full(x)
        logits_rot, z_rot = rotated(x)
    # Assert: a permutation of hidden units computes the same function.
    torch.testing.assert_close(logits_rot, logits, rtol=1e-5, atol=1e-5)
    feature_group = "embed" if arch == "charlm" else spec.groups[len(cfg.channels) - 1].name
    torch.testing.assert_close(z_rot, z[:, torch.from_numpy(units[feature_group])], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapping_sub_window_loads_into_the_sub_model(arch: str) -> None:
    cfg = SMALL[arch]
    spec = model_spec(cfg)
    widths = widths_for_ratio(spec, 0.5)
    units = {g: (np.arange(k) + spec.group(g).size - 1) % spec.group(g).size for g, k in widths.items()}
    sub = build_model(cfg, widths)
    load_numpy(sub, _slice(state_to_numpy(build_model(cfg, seed=0)), spec, units))
    logits, z = sub(_inputs(cfg))
    assert logits.shape[-1] == (cfg.vocab_size if arch == "charlm" else cfg.num_classes)
    assert z.shape == (3, widths["embed" if arch == "charlm" else spec.groups[len(cfg.channels) - 1].name])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("copies", [2, 4])
def test_scaler_makes_a_sub_model_equal_its_tiled_full_model(arch: str, copies: int) -> None:
    # Prepare: a full model whose units are `copies` copies of a sub-model's units
    # sums every split axis `copies` times; the sub-model's scaler K/k must make up for it.
    cfg = SMALL[arch]
    spec = model_spec(cfg)
    widths = {g.name: g.size // copies for g in spec.groups}
    sub = build_model(cfg, widths, seed=2).eval()
    tiled = {}
    for name, value in state_to_numpy(sub).items():
        for axis in spec.sliced_axes(name):
            value = np.concatenate([value] * copies, axis=axis)
        tiled[name] = value
    full = build_model(cfg).eval()
    load_numpy(full, tiled)
    x = _inputs(cfg, seed=3)
    # Execute
    with torch.no_grad():
        logits_sub, z_sub = sub(x)
        logits_full, z_full = full(x)
        for module in sub.modules():  # the same sub-model without its scaler
            if hasattr(module, "in_scale"):
                module.in_scale = 1.0
        logits_unscaled, _ = sub(x)
    # Assert
    torch.testing.assert_close(logits_sub, logits_full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([z_sub] * copies, dim=1), z_full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits_unscaled, logits_full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compensate", [True, False])
def test_compensated_sgd_on_a_sub_model_is_sgd_on_its_tiled_full_model(arch: str, compensate: bool) -> None:
    # Prepare: the tiled full model of test_scaler_... computes what the sub-model computes;
    # with scaler compensation, SGD (momentum, weight decay) must keep the two in step.
    cfg, copies = SMALL[arch], 2
    spec = model_spec(cfg)
    widths = {g.name: g.size // copies for g in spec.groups}
    sub = build_model(cfg, widths, seed=2)

    def tile(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in state.items():
            for axis in spec.sliced_axes(name):
                value = np.concatenate([value] * copies, axis=axis)
            out[name] = value
        return out

    full = build_model(cfg)
    load_numpy(full, tile(state_to_numpy(sub)))
    x = _inputs(cfg, seed=3)
    compensated = scaled_parameters(sub, sub.gradient_scales() if compensate else {})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) for m in (sub, full)]
    # Execute: three steps each
    for _ in range(3):
        for model, opt in zip((sub, full), opts):
            opt.zero_grad()
            logits, _ = model(x)
            (logits.square().mean() + logits[..., 0].mean()).backward()
            if model is sub:
                scale_gradients(compensated)
            opt.step()
    # Assert
    want, got = state_to_numpy(full), tile(state_to_numpy(sub))
    if compensate:
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    else:  # plain SGD moves the split layers faster than the full model does
        assert any(not np.allclose(got[n], want[n], rtol=1e-3, atol=1e-4) for n in want)


def test_gradient_scales_are_the_product_of_k_over_k_over_split_axes() -> None:
    sub = build_model(ModelConfig(arch="cnn"), {"conv0": 16, "conv1": 16, "conv2": 32})
    scales = sub.gradient_scales()
    assert scales["blocks.0.conv.weight"] == 0.5  # output split 16/32, input (image) never
    assert scales["blocks.1.conv.weight"] == 0.5 * 0.25  # 16/32 in, 16/64 out
    assert scales["blocks.2.norm.bias"] == 0.25 and scales["classifier.weight"] == 0.25
    assert "classifier.bias" not in scales  # never split
    assert build_model(ModelConfig(arch="cnn")).gradient_scales() == {}


def test_input_scales_are_one_at_full_width_and_k_over_k_below() -> None:
    cfg = ModelConfig(arch="cnn")
    assert set(build_model(cfg).input_scales().values()) == {1.0}
    sub = build_model(cfg, {"conv0": 16, "conv1": 16, "conv2": 32})
    assert sub.input_scales() == {
        "blocks.0.conv": 1.0,  # reads the image: never split
        "blocks.1.conv": 2.0,  # 32 / 16
        "blocks.2.conv": 4.0,  # 64 / 16
        "classifier": 4.0,  # 128 / 32
    }
    lm = build_model(ModelConfig(arch="charlm"), {"embed": 32, "layer0.heads": 1, "layer1.ffn": 384})
    scales = lm.input_scales()
    assert scales["layers.0.attn.q"] == scales["layers.1.ffn.fc_in"] == scales["head"] == 4.0
    assert scales["layers.0.attn.out"] == 4.0 and scales["layers.1.attn.out"] == 1.0
    assert scales["layers.1.ffn.fc_out"] == pytest.approx(512 / 384) and scales["layers.0.ffn.fc_out"] == 1.0


def test_charlm_is_causal() -> None:
    cfg = SMALL["charlm"]
    model = build_model(cfg, seed=0).eval()
    x = _inputs(cfg, batch=1)
    changed = x.clone()
    changed[0, 6] = (changed[0, 6] + 1) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(x)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :6], before[:, :6])
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_norms_equal_torch_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 5, generator=gen)
    gn = GroupNorm(2, 6)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(6, generator=gen))
        gn.bias.copy_(torch.randn(6, generator=gen))
    torch.testing.assert_close(gn(x), F.group_norm(x, 2, gn.weight, gn.bias, gn.eps), rtol=1e-5, atol=1e-5)
    h = torch.randn(2, 4, 8, generator=gen)
    ln = LayerNorm(8)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8, generator=gen))
    torch.testing.assert_close(ln(h), F.layer_norm(h, (8,), ln.weight, ln.bias, ln.eps), rtol=1e-5, atol=1e-5)


def test_flops_equal_a_hand_count() -> None:
    cnn = ModelConfig(arch="cnn", in_channels=1, image_size=8, num_classes=4, channels=(2, 3))
    # conv 1->2 on 8x8 outputs, conv 2->3 on 4x4 (after one pool), linear 3->4
    assert flops_per_sample(cnn) == 8 * 8 * 2 * 1 * 9 + 4 * 4 * 3 * 2 * 9 + 3 * 4
    assert flops_per_sample(cnn, {"conv0": 1}) == 8 * 8 * 1 * 1 * 9 + 4 * 4 * 3 * 1 * 9 + 3 * 4
    res = ModelConfig(arch="resnet", in_channels=1, image_size=8, num_classes=4, channels=(2, 3))
    stem = 8 * 8 * 2 * 1 * 9
    block0 = 8 * 8 * (2 * 2 * 9 + 2 * 2 * 9)  # stride 1, identity shortcut
    block1 = 4 * 4 * (3 * 2 * 9 + 3 * 3 * 9 + 3 * 2)  # stride 2 to 4x4, 1x1 shortcut
    assert flops_per_sample(res) == stem + block0 + block1 + 3 * 4
    lm = ModelConfig(arch="charlm", vocab_size=5, d_model=4, n_heads=2, head_dim=3, d_ff=7, n_layers=1, context=6)
    per_token = 4 * 6 * 3 + 6 * 4 + 4 * 7 * 2 + 4 * 5  # q, k, v; out; ffn in, out; head
    assert flops_per_sample(lm) == 6 * per_token + 2 * 6 * 6 * 6  # + Q K^T and weights @ V
    assert flops_per_sample(lm, {"layer0.heads": 1}) == 6 * (4 * 3 * 3 + 3 * 4 + 56 + 20) + 2 * 6 * 6 * 3


def test_build_is_deterministic_given_a_seed_and_leaves_the_global_rng_alone() -> None:
    cfg = SMALL["charlm"]
    torch.manual_seed(5)
    expected_draw = torch.rand(1)
    torch.manual_seed(5)
    a = state_to_numpy(build_model(cfg, seed=7))
    draw = torch.rand(1)
    b = state_to_numpy(build_model(cfg, seed=7))
    c = state_to_numpy(build_model(cfg, seed=8))
    assert torch.equal(draw, expected_draw)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["layers.0.attn.q.weight"], c["layers.0.attn.q.weight"])


def test_state_to_numpy_returns_float32_copies() -> None:
    model = build_model(SMALL["cnn"], seed=0)
    weights = state_to_numpy(model)
    assert all(v.dtype == np.float32 for v in weights.values())
    weights["classifier.bias"][:] = 42.0
    assert not torch.any(model.classifier.bias == 42.0)


def test_load_numpy_is_strict_and_names_the_tensor() -> None:
    cfg = SMALL["cnn"]
    model = build_model(cfg, seed=0)
    good = state_to_numpy(build_model(cfg, seed=1))
    load_numpy(model, good)
    np.testing.assert_array_equal(model.classifier.weight.detach().numpy(), good["classifier.weight"])
    with pytest.raises(ConfigError, match="blocks.1.conv.weight"):
        load_numpy(model, {**good, "blocks.1.conv.weight": np.zeros((8, 4, 3, 1), np.float32)})
    with pytest.raises(ConfigError, match="classifier.bias"):
        load_numpy(model, {k: v for k, v in good.items() if k != "classifier.bias"})
    with pytest.raises(ConfigError, match="extra.weight"):
        load_numpy(model, {**good, "extra.weight": np.zeros(1, np.float32)})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "mlp"},
        {"arch": "cnn", "channels": ()},
        {"arch": "cnn", "channels": (8, 0)},
        {"arch": "charlm", "n_heads": 0},
        {"arch": "cnn", "image_size": 4},  # 3 pools of a 4x4 image
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_task_and_bad_widths() -> None:
    assert ModelConfig(arch="resnet").task == "classification"
    assert ModelConfig(arch="charlm").task == "lm"
    cfg = SMALL["cnn"]
    with pytest.raises(ConfigError, match="unknown width groups"):
        build_model(cfg, {"conv9": 2})
    with pytest.raises(ConfigError, match="conv1"):
        build_model(cfg, {"conv1": 9})
