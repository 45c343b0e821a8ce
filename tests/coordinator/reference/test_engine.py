"""The reference engine: equals centralized training, cost figures, real-data improvement."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from msfusion.algorithm.batches import batch_indices
from msfusion.algorithm.inference import choose_deployable
from msfusion.algorithm.merging import Aggregate, MergeConfig, NormAction
from msfusion.algorithm.overlap import OverlapConfig, OverlapMode
from msfusion.algorithm.planning import PlanConfig, Strategy
from msfusion.coordinator.reference.engine import ReferenceEngine, device_cost
from msfusion.data.datasets import ArrayDataset
from msfusion.data.idx import load_fashion_mnist
from msfusion.data.partition import iid
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.models.evaluate import evaluate
from msfusion.models.registry import build_model, load_numpy, model_spec, state_to_numpy
from msfusion.recipe import EngineConfig, LocalTrainConfig

SMALL_CNN = ModelConfig(arch="cnn", channels=(8, 16, 32))


@pytest.fixture(scope="module")
def fmnist() -> tuple[ArrayDataset, ArrayDataset]:
    return load_fashion_mnist()


def test_fedavg_full_with_one_device_equals_centralized_training(fmnist: tuple[ArrayDataset, ArrayDataset]) -> None:
    # Prepare
    train, test = fmnist
    shard = train.subset(np.arange(256))
    local = LocalTrainConfig(epochs=2, batch_size=32, lr=0.05, max_samples=0)
    plain = LossConfig(ContrastiveVariant.OFF)
    cfg = EngineConfig(
        model=SMALL_CNN, plan=PlanConfig(strategy=Strategy.FEDAVG), local=local, loss=plain, rounds=1, seed=3
    )
    engine = ReferenceEngine(cfg, [shard], test.subset(np.arange(200)), [1.0])
    start = {k: v.copy() for k, v in engine.weights.items()}
    # Execute
    engine.run()
    # Assert: a plain torch loop over the same batches gives the same weights.
    from msfusion.recipe import device_seed

    model = build_model(SMALL_CNN)
    load_numpy(model, start)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in batch_indices(256, 32, 2, device_seed(3, 0, 0)):
        logits, _ = model(torch.from_numpy(shard.x[idx]))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(shard.y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = state_to_numpy(model)
    for name, value in expected.items():
        np.testing.assert_allclose(engine.weights[name], value, rtol=1e-5, atol=1e-6)
    assert not np.allclose(engine.weights["blocks.0.conv.weight"], start["blocks.0.conv.weight"])


def test_cost_figures_equal_a_hand_count() -> None:
    cfg = ModelConfig(arch="cnn", in_channels=1, image_size=8, num_classes=3, channels=(4, 8))
    spec = model_spec(cfg)
    half = {g.name: g.size // 2 for g in spec.groups}
    cost = device_cost(cfg, half)
    # conv 1->2 (3x3, bias) + GN(2) + conv 2->4 + GN(4) + linear 4->3
    params = (2 * 1 * 9 + 2) + 2 * 2 + (4 * 2 * 9 + 4) + 2 * 4 + (3 * 4 + 3)
    assert cost.params == params
    assert cost.bytes_per_round == 8 * params
    # MACs: conv1 at 8x8 outputs, conv2 at 4x4 outputs (after one 2x pool), classifier.
    macs = 8 * 8 * 2 * 1 * 9 + 4 * 4 * 4 * 2 * 9 + 4 * 3
    assert cost.flops_per_sample == macs


@pytest.mark.slow
def test_short_msfusion_run_on_real_data_improves_accuracy(fmnist: tuple[ArrayDataset, ArrayDataset]) -> None:
    train, test = fmnist
    rng = np.random.default_rng(0)
    parts = iid(8000, 4, rng)
    shards = [train.subset(p) for p in parts]
    cfg = EngineConfig(
        model=SMALL_CNN,
        plan=PlanConfig(strategy=Strategy.MSFUSION),
        overlap=OverlapConfig(mode=OverlapMode.ADAPTIVE, initial=0.9, minimum=0.5, maximum=0.9),
        local=LocalTrainConfig(epochs=1, batch_size=32, lr=0.05, max_samples=1000),
        loss=LossConfig(variant=ContrastiveVariant.MOON, mu=0.1),
        rounds=4,
        seed=0,
    )
    engine = ReferenceEngine(cfg, shards, test.subset(np.arange(2000)), [0.5] * 4)
    before = evaluate(SMALL_CNN, engine.weights, engine.test)["accuracy"]
    history = engine.run()
    accs = [r.metrics["accuracy"] for r in history]
    assert accs[-1] > before + 0.25, (before, accs)
    assert accs[-1] > accs[0]
    assert all(len(r.merged) == 4 for r in history)


def test_the_deployable_model_is_the_better_full_model_on_validation_data() -> None:
    assert choose_deployable({"merged": {"accuracy": 0.7}, "expected": {"accuracy": 0.8}}) == "expected"
    assert choose_deployable({"merged": {"accuracy": 0.8}, "expected": {"accuracy": 0.7}}) == "merged"
    assert choose_deployable({"merged": {"accuracy": 0.7}, "expected": {"accuracy": 0.7}}) == "merged"  # a tie
    lm = {"merged": {"perplexity": 12.0, "accuracy": 0.5}, "expected": {"perplexity": 11.0, "accuracy": 0.4}}
    assert choose_deployable(lm) == "expected"  # lower perplexity wins for a language model
    # A window is a sub-model, never the deployed full model; without validation figures the merged model stays.
    assert choose_deployable({"merged": {"accuracy": 0.1}, "window": {"accuracy": 0.9}}) == "merged"
    assert choose_deployable({}) == "merged"


def test_eval_every_skips_evaluations_not_training_and_the_run_chooses_on_validation(
    fmnist: tuple[ArrayDataset, ArrayDataset],
) -> None:
    # Prepare: the same msfusion run evaluated every round and every other round
    train, test = fmnist
    shards = [train.subset(np.arange(i * 200, (i + 1) * 200)) for i in range(4)]
    val, held = train.subset(np.arange(50_000, 50_300)), test.subset(np.arange(300))

    def run(every: int) -> ReferenceEngine:
        cfg = EngineConfig(
            model=SMALL_CNN,
            local=LocalTrainConfig(max_samples=64),
            rounds=3,
            seed=1,
            eval_expected=True,
            eval_window=True,
            eval_every=every,
        )
        engine = ReferenceEngine(cfg, shards, held, [0.5] * 4, validation=val)
        engine.run()
        return engine

    # Execute
    each, sparse = run(1), run(2)
    # Assert: the same weights; rounds 1 and 2 (the last) evaluated, round 0 not
    for name, value in each.weights.items():
        np.testing.assert_array_equal(sparse.weights[name], value)
    assert [bool(r.variant_metrics) for r in sparse.history] == [False, True, True]
    assert sparse.history[0].metrics == {} and sparse.history[2].metrics == each.history[2].metrics
    last = each.history[-1]
    assert set(last.variant_metrics) == set(last.validation_metrics) == {"merged", "expected", "window"}
    assert last.deployable == choose_deployable(last.validation_metrics)
    name, weights = each.deployable_weights()
    assert name == last.deployable
    figures = evaluate(SMALL_CNN, weights, held)
    assert figures["accuracy"] == pytest.approx(last.variant_metrics[name]["accuracy"])


def test_native_norms_train_the_same_model_as_the_traced_norms_the_artifacts_run(
    fmnist: tuple[ArrayDataset, ArrayDataset],
) -> None:
    # Prepare: the engine runs eager torch's native GroupNorm; exporters trace the elementwise form
    from msfusion.models import layers

    train, test = fmnist
    shards = [train.subset(np.arange(i * 128, (i + 1) * 128)) for i in range(4)]
    cfg = EngineConfig(model=SMALL_CNN, local=LocalTrainConfig(max_samples=64), rounds=2, seed=2)

    def run() -> dict[str, np.ndarray]:
        engine = ReferenceEngine(cfg, shards, test.subset(np.arange(100)), [0.5] * 4)
        engine.run()
        return engine.weights

    # Execute
    native = run()
    with layers.traceable_norms():
        traced = run()
    # Assert: the same global model within float tolerance
    for name, value in native.items():
        np.testing.assert_allclose(traced[name], value, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_cuda_is_refused_clearly_where_torch_sees_none(fmnist: tuple[ArrayDataset, ArrayDataset]) -> None:
    from msfusion.errors import ConfigError

    train, test = fmnist
    cfg = EngineConfig(model=SMALL_CNN, rounds=1)
    with pytest.raises(ConfigError, match="no CUDA device"):
        ReferenceEngine(cfg, [train.subset(np.arange(32))], test.subset(np.arange(32)), [1.0], device="cuda")


@pytest.mark.parametrize(
    "merge",
    [
        MergeConfig(),
        MergeConfig(norm_bound=4.0, norm_action=NormAction.CLIP),
        MergeConfig(norm_bound=0),
        MergeConfig(norm_bound=0, aggregate=Aggregate.MEDIAN),
    ],
    ids=["default-reject", "clip", "off", "median"],
)
def test_the_engine_merges_with_the_defences_its_config_names(
    fmnist: tuple[ArrayDataset, ArrayDataset], monkeypatch: pytest.MonkeyPatch, merge: MergeConfig
) -> None:
    # Prepare: four devices; dev003's local run returns -20x its update (a test-side hook, as bench/poisoning.py's)
    from msfusion.algorithm.merging import SliceUpdate, merge_slices
    from msfusion.algorithm.planning import plan_round
    from msfusion.coordinator.reference import engine as engine_module

    train, test = fmnist
    shards = [train.subset(np.arange(i * 128, (i + 1) * 128)) for i in range(4)]
    returned: dict[int, Any] = {}
    honest_train = engine_module.local_train

    def local_train(*args: Any, **kwargs: Any) -> Any:
        result = honest_train(*args, **kwargs)
        index = next(i for i, shard in enumerate(shards) if shard is args[4])
        if index == 3:
            start = args[2]
            poisoned = {k: start[k] - 20.0 * (v - start[k]) for k, v in result.weights.items()}
            result = replace(result, weights=poisoned)
        returned[index] = result
        return result

    monkeypatch.setattr(engine_module, "local_train", local_train)
    cfg = EngineConfig(model=SMALL_CNN, local=LocalTrainConfig(max_samples=64), rounds=1, seed=4, merge=merge)
    engine = ReferenceEngine(cfg, shards, test.subset(np.arange(100)), [0.5] * 4)
    initial = {k: v.copy() for k, v in engine.weights.items()}
    # Execute
    (record,) = engine.run()
    # Assert: the engine's merge is merge_slices under its config, and the round record says what it refused
    plan = plan_round(engine.spec, engine.devices, 0, record.overlap, cfg.plan)
    updates = [
        SliceUpdate(d.device_id, 0, plan.units(d.device_id), returned[i].weights, returned[i].n_samples)
        for i, d in enumerate(engine.devices)
    ]
    expected, report = merge_slices(initial, engine.spec, updates, 0, merge)
    for name, value in expected.items():
        assert engine.weights[name].tobytes() == value.tobytes(), name
    assert record.merged == report.merged and dict(record.rejected) == dict(report.rejected)
    assert dict(record.clipped) == dict(report.clipped)
    if merge.norm_bound == 10.0:
        assert record.merged == ("dev000", "dev001", "dev002") and "update norm" in record.rejected["dev003"]
    elif merge.norm_action is NormAction.CLIP:
        assert len(record.merged) == 4 and set(record.clipped) == {"dev003"}
    else:
        assert len(record.merged) == 4 and not record.rejected and not record.clipped


def test_compressed_transfers_train_close_to_fp32_with_a_quarter_of_the_bytes(
    fmnist: tuple[ArrayDataset, ArrayDataset],
) -> None:
    # Prepare: the same four-device msfusion run with weights travelling as fp32, fp16 and int8
    train, test = fmnist
    shards = [train.subset(np.arange(i * 128, (i + 1) * 128)) for i in range(4)]
    runs = {}
    for codec in ("fp32", "fp16", "int8"):
        cfg = EngineConfig(model=SMALL_CNN, local=LocalTrainConfig(max_samples=64), rounds=3, seed=5, codec=codec)
        engine = ReferenceEngine(cfg, shards, test.subset(np.arange(100)), [0.5] * 4)
        # Execute
        history = engine.run()
        runs[codec] = (engine, history)
    # Assert: every byte counted; int8 about a third and fp16 about half of fp32; the models stay close to fp32's
    fp32_engine, fp32_history = runs["fp32"]
    moved = {c: sum(sum(r.bytes_down.values()) + sum(r.bytes_up.values()) for r in h) for c, (_, h) in runs.items()}
    assert all(len(r.bytes_down) == len(r.bytes_up) == 4 for _, h in runs.values() for r in h)
    # (this tiny sub-model pays a larger share of header than the benchmark's: bench/accuracy.py --codecs)
    assert moved["int8"] < 0.35 * moved["fp32"] and moved["fp16"] < 0.6 * moved["fp32"]
    scale = max(float(np.abs(v).max()) for v in fp32_engine.weights.values())
    for codec, tolerance in (("fp16", 1e-2), ("int8", 5e-2)):
        engine, _ = runs[codec]
        gap = max(float(np.abs(engine.weights[n] - fp32_engine.weights[n]).max()) for n in fp32_engine.weights)
        assert 0 < gap < tolerance * scale, codec
    # int8's devices carry their rounding error to the next round (error feedback)
    assert all(m.residual is not None for m in runs["int8"][0].memory.values())
    assert all(m.residual is None for m in runs["fp16"][0].memory.values())
