"""Checkpoints round-trip bit for bit and refuse a torn weights/state pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msfusion.coordinator.fleet.checkpoint import (
    RunState,
    load_checkpoint,
    load_cohold,
    save_checkpoint,
    weights_digest,
)
from msfusion.errors import ArtifactError, ConfigError


def test_a_checkpoint_reads_back_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: values whose last bits matter.
    rng = np.random.default_rng(0)
    weights = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "b.bias": np.array([1e-38, -0.0, np.pi], np.float32),
    }
    state = RunState("run", "0123abcd", 5, 0.85, 0.41234567890123, "ort")
    # Execute
    save_checkpoint(tmp_path, weights, state)
    loaded, loaded_state = load_checkpoint(tmp_path)
    # Assert
    assert loaded_state == state
    for name, value in weights.items():
        assert loaded[name].tobytes() == value.tobytes()
    assert weights_digest(loaded) == weights_digest(weights)


def test_a_newer_checkpoint_replaces_the_older_and_a_corrupt_one_is_refused(tmp_path: Path) -> None:
    # Prepare
    save_checkpoint(tmp_path, {"w": np.zeros(3, np.float32)}, RunState("run", "s", 1, 0.9, None, "ort"))
    save_checkpoint(tmp_path, {"w": np.ones(3, np.float32)}, RunState("run", "s", 2, 0.9, None, "ort"))
    # Execute / Assert: only the newest weights file is left, and it is the one state.json names.
    assert [p.name for p in tmp_path.glob("global-*")] == ["global-r00002.safetensors"]
    weights, state = load_checkpoint(tmp_path)
    assert state.next_round == 2 and weights["w"].tolist() == [1.0, 1.0, 1.0]
    other = tmp_path / "other"
    save_checkpoint(other, {"w": np.full(3, 7.0, np.float32)}, RunState("run", "s", 2, 0.9, None, "ort"))
    (tmp_path / "global-r00002.safetensors").write_bytes((other / "global-r00002.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="does not match"):
        load_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="nothing to resume"):
        load_checkpoint(tmp_path / "missing")


def test_co_hold_counts_are_checkpointed_with_the_weights_and_checked(tmp_path: Path) -> None:
    # Prepare: counts from a few real slices of a tiny CNN
    from msfusion.algorithm.inference import CoHoldStats
    from msfusion.algorithm.spec import widths_for_ratio
    from msfusion.models.config import ModelConfig
    from msfusion.models.registry import input_scales, model_spec

    cfg = ModelConfig(arch="cnn", channels=(4, 8))
    spec = model_spec(cfg)
    stats = CoHoldStats(spec, list(input_scales(cfg, None)))
    widths = widths_for_ratio(spec, 0.3)  # scalers like 8/3, which float32 cannot hold exactly
    for shift in range(3):
        units = {g: (np.arange(k) + shift) % spec.group(g).size for g, k in widths.items()}
        stats.add(units, input_scales(cfg, widths))
    assert any(float(np.float32(s)) != s for s in input_scales(cfg, widths).values())
    weights = {n: np.ones(s, np.float32) for n, s in spec.shapes.items()}
    state = RunState("run", "s", 1, 0.9, None, "ort")
    assert load_cohold_or_none(tmp_path, weights, state) is None  # a checkpoint without counts
    # Execute
    save_checkpoint(tmp_path, weights, state, stats.state())
    restored = CoHoldStats(spec, list(input_scales(cfg, None)))
    restored.load_state(load_cohold(tmp_path))
    # Assert: the co-hold weighted model of the restored counts is the original's, bit for bit
    a, b = stats.expected_weights(weights), restored.expected_weights(weights)
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert any(not np.array_equal(a[n], weights[n]) for n in a)
    # A tampered counts file is refused
    (path,) = tmp_path.glob("cohold-r*.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        load_cohold(tmp_path)


def load_cohold_or_none(folder: Path, weights: dict[str, np.ndarray], state: RunState) -> object:
    save_checkpoint(folder, weights, state)
    return load_cohold(folder)
