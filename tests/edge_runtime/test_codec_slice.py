"""The device's compressed slice: the rounded update with error feedback, and the trained slice kept as the negative."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from msfusion.edge_runtime.ledger import Ledger, slice_index
from msfusion.edge_runtime.trainer import pack_slice
from msfusion.wire.bulk import make_manifest
from msfusion.wire.codec import decode, pack, roundtrip
from msfusion.wire.protocol import AxisUnits, TrainTask
from msfusion.wire.weights import pack_weights, unpack_weights

AXES = {
    "l1.weight": [AxisUnits(axis=0, group="a", unit_size=1)],
    "l1.bias": [AxisUnits(axis=0, group="a", unit_size=1)],
}


def _task(units: list[int], codec: str, task_id: str = "s1-r0-a0") -> TrainTask:
    ref = make_manifest("w-1", "weights", b"x")
    return TrainTask(
        run_id="run",
        round_idx=0,
        device_id="dev000",
        task_id=task_id,
        backend="ort",
        artifact=msgspec.structs.replace(ref, kind="artifact"),
        weights=ref,
        units={"a": units},
        tensor_axes=AXES,
        local_epochs=1,
        batch_size=8,
        lr=0.1,
        max_samples=0,
        mu=0.0,
        tau=0.5,
        contrastive="off",
        optimizer="sgd",
        seed=1,
        deadline_s=60.0,
        codec=codec,  # type: ignore[arg-type]
    )


def _weights(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "l1.weight": rng.standard_normal((rows, 3)).astype(np.float32),
        "l1.bias": rng.standard_normal(rows).astype(np.float32),
    }


def test_an_fp32_task_uploads_the_trained_weights_and_keeps_nothing_beside_them() -> None:
    trained = _weights(np.random.default_rng(0), 2)
    packed, local = pack_slice(_task([0, 1], "fp32"), pack_weights(trained), trained)
    assert packed == pack_weights(trained) and local is None


def test_an_int8_update_carries_the_resliced_residual_and_the_ledger_keeps_the_trained_slice(tmp_path: Path) -> None:
    # Prepare: round 0 holds units [0, 1, 2]; round 1 holds [1, 2, 3] (unit 0 left, unit 3 is new)
    rng = np.random.default_rng(0)
    start0 = _weights(rng, 3)
    trained0 = {n: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for n, v in start0.items()}
    task0 = _task([0, 1, 2], "int8")
    received0 = pack(start0, "int8")
    # Execute: round 0, recorded as the daemon records it
    payload0, local0 = pack_slice(task0, received0, trained0)
    ledger = Ledger(tmp_path)
    ledger.record(task0.key, b"reply", payload0, task0.units, task0.tensor_axes, local=local0)
    # Assert: the upload is the rounded update against what was received; the negative is the trained slice
    update0, codec, is_update = decode(payload0)
    got0 = roundtrip(start0, "int8")
    assert codec == "int8" and is_update
    for name in trained0:
        np.testing.assert_array_equal(update0[name], roundtrip({name: trained0[name] - got0[name]}, "int8")[name])
    previous = ledger.previous_slice("s1-r0-a0")
    assert previous is not None
    for name in trained0:
        np.testing.assert_array_equal(previous[0][name], trained0[name])  # not the upload
    residual0 = ledger.previous_residual("s1-r0-a0")
    assert residual0 is not None
    for name in trained0:
        np.testing.assert_allclose(residual0[name], trained0[name] - got0[name] - update0[name], atol=1e-8)
    # Execute: round 1 over shifted units, with that residual
    task1 = _task([1, 2, 3], "int8", "s1-r1-a0")
    start1 = _weights(rng, 3)
    trained1 = {n: v + 0.01 for n, v in start1.items()}
    payload1, local1 = pack_slice(task1, pack(start1, "int8"), trained1, previous[1], residual0)
    # Assert: units 1 and 2 (rows 0 and 1 now) got their residual back; unit 3 (row 2) started from 0
    got1 = roundtrip(start1, "int8")
    carried = {n: np.zeros_like(v) for n, v in trained1.items()}
    for name in carried:
        carried[name][:2] = residual0[name][1:]
    corrected = {n: trained1[n] - got1[n] + carried[n] for n in trained1}
    update1, _, _ = decode(payload1)
    for name in corrected:
        np.testing.assert_array_equal(update1[name], roundtrip({name: corrected[name]}, "int8")[name])
    assert local1 is not None and local1.residual is not None
    kept = unpack_weights(local1.residual)
    for name in corrected:
        np.testing.assert_allclose(kept[name], corrected[name] - update1[name], atol=1e-8)
    assert slice_index(task1.units, task1.tensor_axes)["l1.weight"][0].tolist() == [1, 2, 3]


def test_an_fp16_update_has_no_residual() -> None:
    rng = np.random.default_rng(2)
    start = _weights(rng, 2)
    trained = {n: v + 0.5 for n, v in start.items()}
    payload, local = pack_slice(_task([0, 1], "fp16"), pack(start, "fp16"), trained)
    assert decode(payload)[1:] == ("fp16", True)
    assert local is not None and local.residual is None
    np.testing.assert_array_equal(unpack_weights(local.trained)["l1.bias"], trained["l1.bias"])
