"""Compressed transfers in the fleet: the codec negotiated per device, the update merged onto the exact sub-model.

The end-to-end test runs four real device daemons (`Daemon`, ONNX Runtime training, in threads of the test
process, which saves each run the processes' start-up) against a real Mosquitto, once per codec; it compares
the bytes the link measured and checks the int8 fleet against the reference engine run with int8. Tolerance:
the fleet matches the fp32 reference within 5e-7 (test_fleet.py); with int8 the same float noise can move an
update element across a rounding boundary, which moves that weight by one quantisation step (max|update| /
127 per channel, about 1e-4 here), so we allow the same atol of 1e-3 as test_fleet.py, far below what a wrong
negative or a misplaced update would change (1e-2 or more). The
residual's exact arithmetic is checked without noise in tests/edge_runtime/test_codec_slice.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_harness import BUDGET_BYTES, ENGINE, MAX_RATIO, MODEL, N_DEVICES, coordinator_config, max_abs_diff

from msfusion.algorithm.merging import MergeAccumulator
from msfusion.algorithm.planning import plan_round
from msfusion.algorithm.slicing import slice_weights
from msfusion.coordinator.fleet.config import RoundConfig
from msfusion.coordinator.fleet.link import SliceArrived
from msfusion.coordinator.fleet.local_fleet import load_shard_set, write_device_configs
from msfusion.coordinator.fleet.registry import Fleet as Registry
from msfusion.coordinator.fleet.registry import ratio_for_memory
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.coordinator.fleet.rounds import RoundContext, _merge_slice, _Sent, make_task, task_codec
from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.coordinator.reference.engine import ReferenceEngine
from msfusion.data.datasets import ArrayDataset
from msfusion.edge_runtime.config import load_device_config
from msfusion.edge_runtime.daemon import Daemon
from msfusion.models.config import ModelConfig
from msfusion.models.registry import build_model, model_spec, state_to_numpy
from msfusion.wire.bulk import make_manifest
from msfusion.wire.codec import CODECS, pack, pack_update, roundtrip
from msfusion.wire.protocol import Capacity, Registration, SliceResult
from msfusion.wire.weights import nbytes, unpack_weights

ATOL = 1e-3
ROUNDS = 2
RUN = "codec-test"


# ---------------------------------------------------------------- negotiation and merge, no broker


def _context(codec: str, tmp_path: Path) -> RoundContext:
    spec = model_spec(MODEL)
    test = ArrayDataset(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.int64))
    return RoundContext(
        run_id=RUN,
        backend="ort",
        engine=replace(ENGINE, codec=codec),
        round=RoundConfig(),
        spec=spec,
        fleet=Registry(spec, RUN, "ort", 30.0),
        link=None,  # type: ignore[arg-type]  # neither negotiating nor merging touches the wire
        artifacts=None,  # type: ignore[arg-type]
        test=test,
        checkpoint_dir=tmp_path,
    )


def _register(ctx: RoundContext, device_id: str, codecs: list[str] | None) -> None:
    knobs = {} if codecs is None else {"codecs": codecs}
    capacity = Capacity(memory_budget_bytes=BUDGET_BYTES, cores=1, arch="x86_64", backends=["ort"], **knobs)
    welcome = ctx.fleet.register(
        Registration(run_id=RUN, device_id=device_id, capacity=capacity, runtime_version="test"), time.monotonic()
    )
    assert welcome.accepted, welcome.reason


def test_a_device_gets_the_runs_codec_only_if_it_lists_it(tmp_path: Path) -> None:
    # Prepare: a current device (every codec), an older one (no codecs field: fp32), one listing a codec unknown here
    ctx = _context("int8", tmp_path)
    _register(ctx, "dev000", list(CODECS))
    _register(ctx, "dev001", None)
    _register(ctx, "dev002", ["fp32", "int4"])
    # Execute
    chosen = {d: task_codec(ctx, d) for d in ("dev000", "dev001", "dev002")}
    # Assert
    assert chosen == {"dev000": "int8", "dev001": "fp32", "dev002": "fp32"}
    assert task_codec(_context("fp32", tmp_path), "dev000") == "fp32"


def _sent_and_slice(ctx: RoundContext, codec: str) -> tuple[_Sent, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A sent int8/fp16 task of dev000's round-0 window, its exact sub-model and the global weights."""
    weights = state_to_numpy(build_model(MODEL, seed=0))
    _register(ctx, "dev000", list(CODECS))
    plan = plan_round(ctx.spec, ctx.fleet.participants(time.monotonic()), 0, 0.5, ctx.engine.plan)
    units = plan.units("dev000")
    sub = slice_weights(weights, ctx.spec, units)
    packed = pack(sub, codec)  # type: ignore[arg-type]
    ref = make_manifest("w-t-dev000", "weights", packed)
    task = make_task(ctx, 0, "s1-r0-a0", "dev000", 0, units, ref, ref, "", codec)  # type: ignore[arg-type]
    return _Sent(task, packed, units, nbytes(sub), 0.5, sub), sub, weights


def _arrived(payload: bytes) -> SliceArrived:
    manifest = make_manifest("s-s1-r0-a0-dev000", "slice", payload)
    result = SliceResult(
        run_id=RUN,
        round_idx=0,
        device_id="dev000",
        task_id="s1-r0-a0",
        weights=manifest,
        n_samples=64,
        loss_curve=[1.0],
        step_time_s=0.0,
        peak_rss_bytes=1,
        wall_s=0.0,
    )
    return SliceArrived(device_id="dev000", result=result, payload=payload)


def test_an_update_merges_onto_the_exact_sub_model_and_a_corrupt_one_is_rejected_with_its_reason(
    tmp_path: Path,
) -> None:
    # Prepare: an int8 update of 0.01 everywhere
    ctx = _context("int8", tmp_path)
    item, sub, weights = _sent_and_slice(ctx, "int8")
    update = {name: np.full_like(values, 0.01) for name, values in sub.items()}
    payload, _ = pack_update(update, "int8", None)
    flipped = bytearray(payload)
    flipped[8:40] = b"{" * 32  # the safetensors header, damaged
    truncated = payload[: len(payload) // 2]
    as_weights = pack(update, "int8")  # an int8 payload, but of weights, not an update
    fp32 = pack(update, "fp32")  # fp32 weights for an int8 task
    # Execute
    good = MergeAccumulator(weights, ctx.spec, 0, ctx.engine.merge)
    verdict = _merge_slice(good, item, _arrived(payload))
    bad: dict[str, str] = {}
    for name, data in (("header", bytes(flipped)), ("truncated", truncated), ("weights", as_weights), ("fp32", fp32)):
        accumulator = MergeAccumulator(weights, ctx.spec, 0, ctx.engine.merge)
        bad[name] = _merge_slice(accumulator, item, _arrived(data))
    # Assert: the merged window is the exact sub-model plus the rounded update (0.01 in int8 is exact to 1e-4)
    assert verdict == "merged"
    merged, report = good.result()
    assert report.merged == ("dev000",)
    window = slice_weights(merged, ctx.spec, item.units)
    expected = {n: sub[n] + roundtrip(update, "int8")[n] for n in sub}
    assert max_abs_diff(window, expected) < 1e-6
    assert bad["header"].startswith("rejected: not a weights payload: "), bad
    assert bad["truncated"].startswith("rejected: not a weights payload: "), bad
    assert bad["weights"] == "rejected: the payload is weights in int8; expected an update in int8"
    assert bad["fp32"] == "rejected: the payload is weights in fp32; expected an update in int8"


# ---------------------------------------------------------------- end to end: real daemons, real broker

# A CNN three times the width of fleet_harness's: at its 1.7k-parameter window, message envelopes and
# heartbeats (about 2 KB a round) would outweigh what the codec saves; at 14k parameters they are 2% of the
# fp32 slice. Two local steps a round keep the torch reference runs short.
WIDE = replace(
    ENGINE,
    model=ModelConfig(arch="cnn", channels=(24, 48, 96)),
    local=replace(ENGINE.local, max_samples=64),
    rounds=ROUNDS,
)
# The daemons run in this process (threads): their memory guard sees its RSS, torch included.
WIDE_BUDGET_BYTES = 8 << 30


@pytest.fixture(scope="module")
def wide_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts

    return ExportedArtifacts(WIDE, "ort", cache_dir=tmp_path_factory.mktemp("wide-artifacts"))


def _reference(shards: Any, codec: str) -> ReferenceEngine:
    data = load_shard_set(shards, WIDE.model)
    ratio = ratio_for_memory(model_spec(WIDE.model), WIDE_BUDGET_BYTES, MAX_RATIO)
    engine = ReferenceEngine(replace(WIDE, codec=codec), data.devices, data.test, [ratio] * N_DEVICES)
    engine.run()
    return engine


def _fleet_run(root: Path, codec: str, broker: Any, shards: Any, artifacts: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Two rounds of four real daemons (threads of this process) and the coordinator, in `codec`."""
    out, run_id = root / codec, f"{RUN}-{codec}"
    paths = write_device_configs(out, shards, run_id, broker.url, "ort", WIDE_BUDGET_BYTES, MAX_RATIO, 30.0)
    daemons = [Daemon(load_device_config(path)) for path in paths]
    threads = [threading.Thread(target=d.run, name=d.config.device_id, daemon=True) for d in daemons]
    for thread in threads:
        thread.start()
    try:
        config = replace(coordinator_config(out, run_id, broker.url, shards), engine=replace(WIDE, codec=codec))
        summary = run_coordinator(config, artifacts)
    finally:
        for daemon, thread in zip(daemons, threads):
            daemon.stop()
            thread.join(10)
    assert summary.ok, summary.reason
    lines = read_metrics(out)
    assert [line["round_idx"] for line in lines] == list(range(ROUNDS))
    for line in lines:
        assert set(line["replies"].values()) == {"merged"}, line["replies"]
    return unpack_weights((out / "model.safetensors").read_bytes()), lines


@pytest.mark.e2e
@pytest.mark.slow
def test_int8_and_fp16_fleets_move_fewer_bytes_and_int8_matches_the_reference_engine_with_int8(
    mosquitto: Any, fleet_shards: Any, wide_artifacts: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: the same fleet, seeds and data in fp32, fp16 and int8, two rounds each
    runs = {codec: _fleet_run(tmp_path, codec, mosquitto, fleet_shards, wide_artifacts) for codec in CODECS}
    # Assert: bytes per device as the link measured them (chunks, messages, heartbeats). Up: every round.
    # Down: round 1 (round 0 also carries the training artifact, the same in every codec).
    up = {c: float(np.mean([v for line in lines for v in line["bytes_up"].values()])) for c, (_, lines) in runs.items()}
    down = {c: float(np.mean(list(lines[1]["bytes_down"].values()))) for c, (_, lines) in runs.items()}
    with capsys.disabled():
        print(f"\nbytes per device and round: up {up}, down (round 1) {down}")
    assert up["int8"] <= 0.3 * up["fp32"] and up["fp16"] <= 0.55 * up["fp32"], up
    assert down["int8"] <= 0.3 * down["fp32"] and down["fp16"] <= 0.55 * down["fp32"], down
    # int8 (error feedback, the trained slice as the negative): the fleet's model is the reference engine's with
    # the same codec, within float noise (see the module doc). Both codecs stay near the fp32 fleet's model:
    # they move it by their rounding only (measured 2e-4 for fp16, 5e-4 for int8; allowed 10x that).
    gap = max_abs_diff(runs["int8"][0], _reference(fleet_shards, "int8").weights)
    near = {codec: max_abs_diff(runs[codec][0], runs["fp32"][0]) for codec in ("fp16", "int8")}
    with capsys.disabled():
        print(f"int8 fleet vs int8 reference engine: {gap:.2e}; vs the fp32 fleet: {near}")
    assert gap < ATOL
    assert 0 < near["fp16"] < 2e-3 and 0 < near["int8"] < 5e-3, near
