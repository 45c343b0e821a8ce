"""Fuzzing the merge: malformed slices are refused with InvalidSlice and leave the merged model byte-identical.

Each example merges a round's good slices alone, then the same good slices
with malformed ones in between (wrong shapes, NaN/inf, wrong dtypes, values
beyond float32, bad unit indices, missing or extra tensors or groups, wrong
round, bad sample counts, duplicates, damaged payloads): every malformed one
must raise InvalidSlice (or ArtifactError on unpacking) with a reason, and
the two merges must give the same bytes, under every merge configuration.
Budgets: `tests/fuzzing.py` (MSFUSION_FUZZ_PROFILE=ci|bench).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from fuzzing import SEEDS, fuzz, mutate, no_hang, record, shortfalls, summary
from hypothesis import given

from msfusion.algorithm.merging import Aggregate, MergeAccumulator, MergeConfig, NormAction, SliceUpdate
from msfusion.algorithm.slicing import slice_weights
from msfusion.algorithm.spec import ModelSpec
from msfusion.errors import ArtifactError, InvalidSlice
from msfusion.models.config import ModelConfig
from msfusion.models.registry import model_spec
from msfusion.wire.weights import pack_weights, unpack_weights

ROUND = 4
SPECS: dict[str, ModelSpec] = {
    "cnn": model_spec(ModelConfig("cnn", in_channels=1, image_size=8, num_classes=3, channels=(4, 6, 8))),
    # attention heads: a group whose units are two elements wide
    "charlm": model_spec(
        ModelConfig("charlm", vocab_size=5, d_model=8, n_heads=2, head_dim=2, d_ff=8, n_layers=1, context=4)
    ),
}
CONFIGS = {
    "mean": MergeConfig(norm_bound=0),  # streaming
    "mean-bounded": MergeConfig(),  # the default: 10x norm bound, reject
    "median": MergeConfig(aggregate=Aggregate.MEDIAN),
    "trimmed-clip": MergeConfig(aggregate=Aggregate.TRIMMED_MEAN, norm_bound=2.0, norm_action=NormAction.CLIP),
}
CORRUPTIONS = [
    "round",
    "n_samples",
    "missing_tensor",
    "extra_tensor",
    "shape",
    "non_finite",
    "dtype",
    "beyond_float32",
    "not_an_array",
    "units_group",
    "units_range",
    "units_repeat",
    "units_type",
    "units_width",
    "duplicate",
]


def good_update(rng: random.Random, spec: ModelSpec, global_w: dict[str, np.ndarray], device: str) -> SliceUpdate:
    """A device's honest slice: a random window of every group, trained a little (small noise)."""
    units = {g.name: np.array(rng.sample(range(g.size), rng.randint(1, g.size)), dtype=np.int64) for g in spec.groups}
    sub = slice_weights(global_w, spec, units)
    noise = np.random.default_rng(rng.randrange(2**32))
    trained = {n: (a + 0.01 * noise.standard_normal(a.shape)).astype(np.float32) for n, a in sub.items()}
    return SliceUpdate(device, ROUND, units, trained, rng.randint(1, 1000))


def corrupt(rng: random.Random, spec: ModelSpec, template: SliceUpdate, kind: str, device: str) -> SliceUpdate:
    """A malformed copy of `template` (from `device`), broken the `kind` way."""
    units: dict[str, Any] = {g: u.copy() for g, u in template.units.items()}
    weights: dict[str, Any] = {n: a.copy() for n, a in template.weights.items()}
    fields: dict[str, Any] = {}
    name = rng.choice(sorted(weights))
    group = rng.choice(spec.groups)
    if kind == "round":
        fields["round_idx"] = rng.choice([ROUND - 1, ROUND + 1, -1, 2**63])
    elif kind == "n_samples":
        fields["n_samples"] = rng.choice([0, -1, -(2**63), 1.5, float("nan"), float("inf"), "5", None, True, 3.0])
    elif kind == "missing_tensor":
        del weights[name]
    elif kind == "extra_tensor":
        weights[rng.choice(["extra.weight", name + "x", name.upper()])] = weights[name]
    elif kind == "shape":
        array = weights[name]
        weights[name] = rng.choice(
            [
                np.zeros((*array.shape, 1), np.float32),
                np.zeros((array.size + 1,), np.float32),
                np.zeros((), np.float32),
                np.zeros((0, *array.shape[1:]), np.float32),
                array.reshape(-1) if array.ndim > 1 else np.zeros((array.size, 2), np.float32),
            ]
        )
    elif kind == "non_finite":
        array = weights[name].copy()
        array.reshape(-1)[rng.randrange(array.size)] = rng.choice([np.nan, np.inf, -np.inf])
        weights[name] = array
    elif kind == "dtype":
        dtype = rng.choice([np.int32, np.int64, np.uint8, np.bool_, np.complex64, object, "U3", "S4"])
        weights[name] = weights[name].astype(dtype)
    elif kind == "beyond_float32":  # finite in float64, infinite once merged into the float32 model
        array = weights[name].astype(np.float64)
        array.reshape(-1)[rng.randrange(array.size)] = rng.choice([1e39, -1e300, np.finfo(np.float64).max])
        weights[name] = array
    elif kind == "not_an_array":
        weights[name] = rng.choice([weights[name].tolist(), None, 0.5, "weights", {"a": 1}])
    elif kind == "units_group":
        if rng.random() < 0.5:
            del units[group.name]
        else:
            units[group.name + "-extra"] = units[group.name]
    elif kind == "units_range":
        u = units[group.name].copy()
        u[rng.randrange(u.size)] = rng.choice([group.size, group.size + 5, -1, -group.size, 2**40])
        units[group.name] = u
    elif kind == "units_repeat":
        u = units[group.name]
        if u.size < 2:
            u = np.array([u[0], u[0]], np.int64)  # repeated, and one too wide for the weights besides
        else:
            u = u.copy()
            u[1] = u[0]
        units[group.name] = u
    elif kind == "units_type":
        u = units[group.name]
        units[group.name] = rng.choice(
            [u.astype(np.float64), u.reshape(1, -1), u.tolist(), u.astype(np.bool_), np.array([], np.int64), None, 3]
        )
    elif kind == "units_width":  # one unit more or fewer than the weights were cut for
        u = units[group.name]
        spare = sorted(set(range(group.size)) - set(u.tolist()))
        if spare and (rng.random() < 0.5 or u.size == 1):
            units[group.name] = np.append(u, rng.choice(spare))
        else:
            units[group.name] = u[:-1] if u.size > 1 else np.array([], np.int64)
    elif kind == "duplicate":
        pass  # a second, valid slice from a device already merged: `device` is that device
    return SliceUpdate(
        fields.get("device_id", device),
        fields.get("round_idx", template.round_idx),
        units,
        weights,
        fields.get("n_samples", template.n_samples),
    )


def _bytes(weights: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {n: (str(a.dtype), a.shape, a.tobytes()) for n, a in weights.items()}


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("arch", sorted(SPECS))
@fuzz("merge.malformed_slices", 120)
@given(seed=SEEDS)
def test_malformed_slices_leave_the_merge_byte_identical(arch: str, config_name: str, seed: int) -> None:
    # Prepare: a round's good slices, and malformed ones to slip in between them
    rng = random.Random(seed)
    spec, config = SPECS[arch], CONFIGS[config_name]
    weights_rng = np.random.default_rng(rng.randrange(2**32))
    global_w = {n: weights_rng.standard_normal(s).astype(np.float32) for n, s in spec.shapes.items()}
    global_before = _bytes(global_w)
    goods = [good_update(rng, spec, global_w, f"dev{i}") for i in range(rng.randint(0, 5))]
    sequence: list[tuple[SliceUpdate, str]] = [(u, "good") for u in goods]
    for index in range(rng.randint(1, 6)):
        kind = rng.choice(CORRUPTIONS)
        template = rng.choice(goods) if goods else good_update(rng, spec, global_w, "template")
        if kind == "duplicate":
            if not goods:
                continue
            at = next(i for i, (u, _) in enumerate(sequence) if u is template) + 1
            sequence.insert(
                rng.randint(at, len(sequence)), (corrupt(rng, spec, template, kind, template.device_id), kind)
            )
            continue
        device = template.device_id if rng.random() < 0.3 else f"bad{index}"  # a bad slice may claim a good id
        sequence.insert(rng.randint(0, len(sequence)), (corrupt(rng, spec, template, kind, device), kind))
    # Execute: the good slices alone, then everything, each malformed slice refused as it comes
    alone = MergeAccumulator(global_w, spec, ROUND, config)
    for update in goods:
        alone.add(update)
    expected, expected_report = alone.result()
    mixed = MergeAccumulator(global_w, spec, ROUND, config)
    with no_hang():
        for update, kind in sequence:
            if kind == "good":
                mixed.add(update)
                continue
            try:
                mixed.add(update)
            except InvalidSlice as exc:
                assert str(exc), f"a {kind} slice is refused with a reason"
            else:
                pytest.fail(f"a {kind} slice was merged: units {update.units}, n_samples {update.n_samples!r}")
            record("merge.malformed_slices.refusals", kind, "rejected")
        merged, report = mixed.result()
    # Assert: byte-identical, the same slices merged, and the inputs untouched
    assert _bytes(merged) == _bytes(expected)
    assert report.merged == expected_report.merged
    assert _bytes(global_w) == global_before
    assert all(np.isfinite(a).all() for a in merged.values())
    record("merge.malformed_slices", f"{arch}-{config_name}", f"{len(sequence) - len(goods)}-refused")


@fuzz("merge.damaged_payload", 200)
@given(seed=SEEDS)
def test_a_damaged_slice_payload_is_refused_before_the_merge(seed: int) -> None:
    """The fleet's path: a slice's bytes, damaged on the way, then unpacked and merged (`rounds._merge_slice`)."""
    # Prepare
    rng = random.Random(seed)
    spec = SPECS[rng.choice(sorted(SPECS))]
    weights_rng = np.random.default_rng(rng.randrange(2**32))
    global_w = {n: weights_rng.standard_normal(s).astype(np.float32) for n, s in spec.shapes.items()}
    update = good_update(rng, spec, global_w, "dev0")
    blob = mutate(rng, pack_weights(update.weights))
    accumulator = MergeAccumulator(global_w, spec, ROUND, MergeConfig(norm_bound=0))
    # Execute
    with no_hang():
        try:
            trained = unpack_weights(blob)
            accumulator.add(SliceUpdate("dev0", ROUND, update.units, trained, update.n_samples))
        except (ArtifactError, InvalidSlice) as exc:
            assert str(exc)
            outcome = "rejected"
        else:
            outcome = "merged"
    merged, _ = accumulator.result()
    # Assert: refused, and the model untouched; or the damage missed the tensors (the checksum says so)
    if outcome == "rejected":
        assert _bytes(merged) == _bytes(global_w)
    else:
        assert _bytes(trained) == _bytes(update.weights)
    record("merge.damaged_payload", "-", outcome)


def test_every_merge_target_ran_its_budget() -> None:
    """Runs last in this module: every fuzz target above ran the examples its profile asked for."""
    if not summary("merge."):
        pytest.skip("no merge fuzz target ran in this session")
    assert not shortfalls("merge."), shortfalls("merge.")
