"""The wire schema: every message round-trips; malformed input raises ProtocolError."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from msfusion.errors import (
    ArtifactError,
    DataError,
    MemoryBudgetExceeded,
    ProtocolError,
)
from msfusion.wire import protocol as p

SHA = "ab" * 32


def _ref(kind: p.BulkKind = "weights", total: int = 3_000_000) -> p.BulkRef:
    return p.BulkRef(transfer_id=f"t-{kind}", kind=kind, total_bytes=total, sha256=SHA, n_chunks=3, chunk_bytes=1 << 20)


def _profile() -> p.ProfileReport:
    return p.ProfileReport(
        run_id="run1",
        device_id="pi-4.a",
        entries=[p.ProfileEntry(width_ratio=0.5, batch_size=32, peak_rss_bytes=123_456_789, step_time_s=0.25)],
    )


def _task() -> p.TrainTask:
    return p.TrainTask(
        run_id="run1",
        round_idx=3,
        device_id="pi-4.a",
        task_id="r3-pi-4.a",
        backend="ort",
        artifact=_ref("artifact"),
        weights=_ref("weights"),
        units={"stage1": [5, 6, 7, 0], "stage2": [1, 2]},
        tensor_axes={
            "stage1.conv.weight": [p.AxisUnits(axis=0, group="stage1", unit_size=1)],
            "stage2.conv.weight": [
                p.AxisUnits(axis=0, group="stage2", unit_size=1),
                p.AxisUnits(axis=1, group="stage1", unit_size=1),
            ],
        },
        local_epochs=2,
        batch_size=32,
        lr=0.01,
        max_samples=0,
        mu=1.0,
        tau=0.5,
        contrastive="moon",
        optimizer="sgd",
        seed=1234,
        deadline_s=600.0,
    )


def every_message() -> list[p.Message]:
    return [
        p.Registration(
            run_id="run1",
            device_id="pi-4.a",
            capacity=p.Capacity(
                memory_budget_bytes=512 << 20,
                cores=4,
                arch="aarch64",
                backends=["ort", "executorch"],
                max_width_ratio=0.75,
            ),
            runtime_version="0.1.0",
            profile=_profile(),
        ),
        _profile(),
        p.Welcome(run_id="run1", device_id="pi-4.a", accepted=False, reason="run is full"),
        p.RunControl(run_id="run1", device_id="pi-4.a", command="stop"),
        p.Heartbeat(
            run_id="run1", device_id="pi-4.a", state="training", task_id="r3-pi-4.a", progress=0.4, sent_at=1.7e9
        ),
        _task(),
        p.SliceResult(
            run_id="run1",
            round_idx=3,
            device_id="pi-4.a",
            task_id="r3-pi-4.a",
            weights=_ref("slice"),
            n_samples=600,
            loss_curve=[2.3, 1.9, float("nan")],
            step_time_s=0.2,
            peak_rss_bytes=300 << 20,
            wall_s=42.0,
        ),
        p.TaskFailed(
            run_id="run1",
            round_idx=3,
            device_id="pi-4.a",
            task_id="r3-pi-4.a",
            code="memory_budget",
            reason="peak 600 MiB over budget 512 MiB",
            details={"peak_bytes": 600 << 20, "ratio": 1.17, "at": "step 3"},
        ),
        p.Chunk(transfer_id="t-weights", index=2, n_chunks=3, sha256=SHA, data=b"\x00\x01" * 100),
        p.ChunkRequest(run_id="run1", device_id="pi-4.a", transfer_id="t-weights", missing=[0, 2]),
    ]


def _raw(msg: p.Message) -> dict[str, Any]:
    raw = msgspec.to_builtins(msg, builtin_types=(bytes,))
    assert isinstance(raw, dict)
    return raw


def _bytes(raw: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize("msg", every_message(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    data = p.encode(msg)
    back = p.decode(data)
    assert type(back) is type(msg)
    if isinstance(msg, p.SliceResult):  # NaN != NaN: compare the rest
        assert msgspec.structs.replace(back, loss_curve=[]) == msgspec.structs.replace(msg, loss_curve=[])
        assert back.loss_curve[:2] == msg.loss_curve[:2]
    else:
        assert back == msg
    assert _raw(msg)["schema_version"] == p.SCHEMA_VERSION


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in every_message()} == set(p.MESSAGE_TYPES)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        msgspec.msgpack.encode({"schema_version": 1}),
        b"not msgpack at all",
        p.encode(_task())[:-7],
    ],
    ids=["empty", "bad-opcode", "array", "no-type", "text", "truncated"],
)
def test_malformed_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed|invalid"):
        p.decode(data)


@pytest.mark.parametrize("msg", every_message(), ids=lambda m: type(m).__name__)
def test_other_schema_version_is_rejected(msg: p.Message) -> None:
    raw = _raw(msg)
    raw["schema_version"] = p.SCHEMA_VERSION + 1
    with pytest.raises(ProtocolError, match="schema version 2"):
        p.decode(_bytes(raw))


def test_unknown_type_is_rejected() -> None:
    raw = _raw(every_message()[0])
    raw["type"] = "teleport"
    with pytest.raises(ProtocolError, match="unknown message type 'teleport'"):
        p.decode(_bytes(raw))


def test_unknown_fields_are_ignored_for_compatible_additions() -> None:
    raw = _raw(_task())
    raw["compression"] = "zstd"
    assert p.decode(_bytes(raw)) == _task()


@pytest.mark.parametrize("bad_id", ["", "a/b", "+", "#", "dev 1", "dev\n", "-dev", "$SYS", "x" * 65, "dév"])
def test_unsafe_ids_are_rejected(bad_id: str) -> None:
    for msg in every_message():
        raw = _raw(msg)
        key = "device_id" if "device_id" in raw else "transfer_id"
        raw[key] = bad_id
        with pytest.raises(ProtocolError, match=key):
            p.decode(_bytes(raw))


def test_longest_safe_id_is_accepted() -> None:
    raw = _raw(_task())
    raw["device_id"] = "d" + "x" * 63
    assert p.decode(_bytes(raw)).device_id == "d" + "x" * 63


@pytest.mark.parametrize(
    ("msg_index", "path", "value", "reason"),
    [
        (5, ("round_idx",), -1, "round_idx"),
        (5, ("batch_size",), 0, "batch_size"),
        (5, ("max_samples",), -5, "max_samples"),
        (5, ("units", "stage1", 1), -2, "units"),
        (5, ("lr",), float("nan"), "lr"),
        (5, ("tau",), 0.0, "tau"),
        (5, ("seed",), -1, "seed"),
        (5, ("weights", "total_bytes"), -1, "total_bytes"),
        (5, ("weights", "n_chunks"), 7, "n_chunks 7 does not fit"),
        (5, ("weights", "sha256"), "AB" * 32, "sha256"),
        (5, ("artifact", "kind"), "model", "kind"),
        (5, ("tensor_axes", "stage1.conv.weight", 0, "group"), "stage9", "unknown group 'stage9'"),
        (6, ("n_samples",), -1, "n_samples"),
        (6, ("peak_rss_bytes",), -1, "peak_rss_bytes"),
        (7, ("code",), "oops", "code"),
        (4, ("state",), "sleeping", "state"),
        (4, ("progress",), 1.5, "progress"),
        (0, ("capacity", "backends"), [], "backends"),
        (0, ("capacity", "max_width_ratio"), 1.5, "max_width_ratio"),
        (0, ("capacity", "memory_budget_bytes"), 0, "memory_budget_bytes"),
        (8, ("index",), 3, "index 3 >= n_chunks 3"),
        (8, ("index",), -1, "index"),
        (8, ("data",), b"x" * (p.MAX_CHUNK_BYTES + 1), "data"),
        (9, ("missing",), [], "missing"),
        (9, ("missing",), [1, -1], "missing"),
    ],
)
def test_invalid_fields_are_rejected(msg_index: int, path: tuple[Any, ...], value: Any, reason: str) -> None:
    # Prepare: a valid message with one field made invalid
    raw = _raw(every_message()[msg_index])
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    # Execute / Assert
    with pytest.raises(ProtocolError, match=reason):
        p.decode(_bytes(raw))


def test_encode_validates_at_the_sender() -> None:
    bad = msgspec.structs.replace(_task(), device_id="a/b")
    with pytest.raises(ProtocolError, match="device_id"):
        p.encode(bad)
    with pytest.raises(ProtocolError, match="not a protocol message"):
        p.encode(_ref())  # type: ignore[arg-type]


def test_cross_field_rules_also_hold_on_construction() -> None:
    with pytest.raises(ValueError, match="n_chunks"):
        p.BulkRef(transfer_id="t", kind="slice", total_bytes=10, sha256=SHA, n_chunks=2, chunk_bytes=10)


def test_idempotency_key_names_run_round_device_task() -> None:
    task = _task()
    assert task.key == ("run1", 3, "pi-4.a", "r3-pi-4.a")
    result, failed = every_message()[6], every_message()[7]
    assert isinstance(result, p.SliceResult) and isinstance(failed, p.TaskFailed)
    assert result.key == failed.key == task.key


def test_failure_codes() -> None:
    assert p.failure_code(MemoryBudgetExceeded("x")) == "memory_budget"
    assert p.failure_code(ArtifactError("x")) == "artifact"
    assert p.failure_code(DataError("x")) == "data"
    assert p.failure_code(ProtocolError("x")) == "protocol"
    assert p.failure_code(KeyError("x")) == "internal"


def test_a_task_names_its_codec_and_an_older_peers_messages_still_decode() -> None:
    # Prepare: an int8 task; the same task and a capacity as a peer before codecs sends them (no such fields)
    int8 = msgspec.structs.replace(_task(), codec="int8")
    older_task = _raw(_task())
    del older_task["codec"]
    capacity = p.Capacity(memory_budget_bytes=1 << 30, cores=4, arch="aarch64", backends=["ort"])
    older_capacity = _raw(p.Registration(run_id="run1", device_id="pi-4.a", capacity=capacity, runtime_version="1"))
    del older_capacity["capacity"]["codecs"]
    # A newer device may list a codec this side does not know: its registration still decodes
    newer = _raw(p.Registration(run_id="run1", device_id="pi-4.a", capacity=capacity, runtime_version="1"))
    newer["capacity"]["codecs"] = ["fp32", "int8", "int4"]
    # Execute / Assert
    decoded = p.decode(p.encode(int8))
    assert isinstance(decoded, p.TrainTask) and decoded.codec == "int8"
    older = p.decode(_bytes(older_task))
    assert isinstance(older, p.TrainTask) and older.codec == "fp32"
    registration = p.decode(_bytes(older_capacity))
    assert isinstance(registration, p.Registration) and registration.capacity.codecs == ["fp32"]
    registration = p.decode(_bytes(newer))
    assert isinstance(registration, p.Registration) and registration.capacity.codecs == ["fp32", "int8", "int4"]


def test_a_task_in_an_unknown_codec_is_refused_on_decode_and_on_construction() -> None:
    raw = _raw(_task())
    raw["codec"] = "int4"
    with pytest.raises(ProtocolError, match="codec"):
        p.decode(_bytes(raw))
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        msgspec.structs.replace(_task(), codec="int4")  # type: ignore[arg-type]
