"""Activation counts match what torch's autograd keeps for the exported (traced) form of each model."""

from __future__ import annotations

import pytest
import torch

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.coordinator.fleet.sizing import model_sizes
from msfusion.models import layers
from msfusion.models.config import ModelConfig
from msfusion.models.objective import LocalObjective
from msfusion.models.registry import activation_elements, build_model, model_spec

CONFIGS = {
    "cnn": ModelConfig("cnn"),
    "resnet": ModelConfig("resnet", in_channels=3, image_size=32, channels=(16, 32, 64), blocks_per_stage=2),
    "charlm": ModelConfig("charlm"),
}
BATCH = 4


def _saved_float32_units(cfg: ModelConfig, ratio: float) -> float:
    """Bytes / 4 of the non-parameter tensors autograd saves for one sample (by storage, once each)."""
    spec = model_spec(cfg)
    model = build_model(cfg, widths_for_ratio(spec, ratio), seed=0)
    objective = LocalObjective(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    generator = torch.Generator().manual_seed(0)
    if cfg.task == "lm":
        x = torch.randint(0, cfg.vocab_size, (BATCH, cfg.context), generator=generator)
        y = torch.randint(0, cfg.vocab_size, (BATCH, cfg.context), generator=generator)
    else:
        x = torch.randn(BATCH, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
        y = torch.randint(0, cfg.num_classes, (BATCH,), generator=generator)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    # The counts model what a board's artifact keeps: the norms in the exporters' traced (elementwise) form.
    with layers.traceable_norms(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(x, y)
    return sum(storages.values()) / 4 / BATCH


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.125])
def test_activation_counts_match_autograd(arch: str, ratio: float) -> None:
    cfg = CONFIGS[arch]
    # Execute
    ours = activation_elements(cfg, widths_for_ratio(model_spec(cfg), ratio))
    saved = _saved_float32_units(cfg, ratio)
    # Assert
    assert ours == pytest.approx(saved, rel=0.01)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_model_sizes_grow_with_width(arch: str) -> None:
    sizes = model_sizes(CONFIGS[arch])
    ratios = [k / 16 for k in range(1, 17)]
    params = [sizes.param_count(r) for r in ratios]
    activations = [sizes.activation_elements(r) for r in ratios]
    assert params == sorted(params) and params[-1] == model_spec(CONFIGS[arch]).param_count()
    # Below full width activations grow; at full width the scaler's input copies go away.
    assert activations[:-1] == sorted(activations[:-1]) and activations[-1] <= 2 * activations[-2]
