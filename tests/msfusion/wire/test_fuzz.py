"""Fuzzing what crosses the wire: every decoder, the chunk reassembler, the device config, data reports.

Thousands of malformed, truncated, oversized, mutated and type-confused inputs
(`tests/fuzzing.py` sets how many: MSFUSION_FUZZ_PROFILE=ci|bench). Each one
must be accepted as a valid value or rejected with the error its function
documents (ProtocolError, ArtifactError, InvalidSlice, ConfigError, DataError,
TransferIncomplete), with a reason; any other exception, a hang, or an
allocation sized by a lying field fails the test. A reassembled payload is
exactly the bytes that were sent.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np
import pytest
import safetensors.numpy
from fuzzing import JSON_JUNK, JUNK, SCALARS, bounded_memory, fuzz, mutated, no_hang, record, shortfalls, summary
from hypothesis import given
from hypothesis import strategies as st

from msfusion.data.sources import ModelInputs, check_report, combine_reports
from msfusion.edge_runtime.config import load_device_config
from msfusion.errors import ArtifactError, ConfigError, DataError, InvalidSlice, ProtocolError
from msfusion.wire import protocol as p
from msfusion.wire.artifacts import (
    MANIFEST_NAME,
    ArtifactKind,
    ArtifactManifest,
    OptimizerConfig,
    TensorInfo,
    describe_files,
    pack_artifact,
    unpack_artifact,
    verify_files,
    write_manifest,
)
from msfusion.wire.bulk import (
    BulkReceiver,
    Reassembly,
    TransferIncomplete,
    iter_chunks,
    make_manifest,
    receive,
    sha256_hex,
)
from msfusion.wire.transport import Received
from msfusion.wire.weights import _digest, pack_weights, unpack_weights

Draw = Callable[..., Any]
SHA = "ab" * 32
TAGS = sorted(t.__struct_config__.tag for t in p.MESSAGE_TYPES)
_DEEP = "\x00deep-nesting-goes-here\x00"  # replaced, after encoding, by thousands of nested arrays


# ---------------------------------------------------------------- protocol.decode


def _ref(kind: p.BulkKind, total: int = 3_000_000) -> p.BulkRef:
    chunk = 1 << 20
    return p.BulkRef(
        transfer_id=f"t-{kind}", kind=kind, total_bytes=total, sha256=SHA, n_chunks=-(-total // chunk), chunk_bytes=chunk
    )


def _report() -> p.DataReport:
    return p.DataReport(
        format="images",
        task="classification",
        n_samples=600,
        sample_shape=[1, 28, 28],
        channel_stats=p.ChannelStats(count=600 * 784, mean=[0.29], m2=[0.1 * 600 * 784]),
        class_counts={"0": 300, "7": 300},
        problems=["2 images unreadable"],
    )


def _messages() -> dict[str, p.Message]:
    """One valid message of every type, with its optional fields set."""
    profile = p.ProfileReport(
        run_id="run1",
        device_id="pi-4.a",
        entries=[p.ProfileEntry(width_ratio=0.5, batch_size=32, peak_rss_bytes=123_456_789, step_time_s=0.25)],
        model_key="cnn-abc",
    )
    task = p.TrainTask(
        run_id="run1",
        round_idx=3,
        device_id="pi-4.a",
        task_id="r3-pi-4.a",
        backend="ort",
        artifact=_ref("artifact"),
        weights=_ref("weights", 40_000),
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
        lr=0.05,
        max_samples=0,
        mu=1.0,
        tau=0.5,
        contrastive="moon",
        optimizer="sgd",
        seed=7,
        deadline_s=120.0,
        signature=b"\x01" * 64,
        preprocessing=p.Preprocessing(mean=[0.29], std=[0.35], classes=["0", "7"]),
    )
    messages: list[p.Message] = [
        p.Registration(
            run_id="run1",
            device_id="pi-4.a",
            capacity=p.Capacity(
                memory_budget_bytes=512 << 20, cores=4, arch="aarch64", backends=["ort"], max_width_ratio=0.75
            ),
            runtime_version="0.1.0",
            profile=profile,
            data=_report(),
        ),
        profile,
        p.Welcome(run_id="run1", device_id="pi-4.a", accepted=False, reason="run is full"),
        p.RunControl(run_id="run1", device_id="pi-4.a", command="stop", reason="done"),
        p.Heartbeat(run_id="run1", device_id="pi-4.a", state="training", task_id="r3", progress=0.4, sent_at=1.7e9),
        task,
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
    return {type(m).__name__: m for m in messages}


MESSAGES = _messages()
ENCODED = {name: p.encode(msg) for name, msg in MESSAGES.items()}


def test_every_message_type_is_fuzzed() -> None:
    assert {type(m) for m in MESSAGES.values()} == set(p.MESSAGE_TYPES)


def check_decode(data: bytes) -> str:
    """Decode `data`: a ProtocolError with a reason, or a message that is valid all through."""
    with no_hang():
        try:
            msg = p.decode(data)
        except ProtocolError as exc:
            assert str(exc), "a rejection names its reason"
            return "rejected"
    # Accepted: it is a message, and valid: it encodes (encode re-validates) to the same message.
    assert isinstance(msg, p.MESSAGE_TYPES)
    again = p.decode(p.encode(msg))
    assert msgspec.msgpack.encode(again) == msgspec.msgpack.encode(msg)  # NaN-safe equality
    return "accepted"


def _raw(msg: Any) -> Any:
    return msgspec.to_builtins(msg, builtin_types=(bytes,))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a tree of dicts and lists (the root excluded)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, prefix + (index,))
    return out


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        root = root[key]
    return root


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    return _get(root, path[:-1])


@st.composite
def confused(draw: Draw, raw: dict[str, Any], *, tags: list[str] | None = None, junk: Any = JUNK) -> Any:
    """`raw` (a tree of builtins) with 1..3 fields replaced, deleted, added, retagged or nested deep."""
    raw = copy.deepcopy(raw)
    deep = False
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "retag", "deep"]))
        paths = _paths(raw)
        if op in ("replace", "deep", "delete") and not paths:
            op = "add"
        if op == "replace":
            path = draw(st.sampled_from(paths))
            _parent(raw, path)[path[-1]] = draw(junk)
        elif op == "delete":
            path = draw(st.sampled_from(paths))
            del _parent(raw, path)[path[-1]]
        elif op == "add":
            dicts = [q for q in [(), *paths] if isinstance(_get(raw, q), dict)]
            _get(raw, draw(st.sampled_from(dicts)))[draw(st.text(max_size=12))] = draw(junk)
        elif op == "retag" and tags:
            raw["type"] = draw(st.sampled_from(tags) | SCALARS)
        elif op == "deep" and not deep:
            path = draw(st.sampled_from(paths))
            _parent(raw, path)[path[-1]] = _DEEP
            deep = True
    return raw


def encode_confused(raw: Any, depth: int) -> bytes:
    """MessagePack of `raw`, the `_DEEP` marker (if any) replaced by `depth` nested one-element arrays."""
    data = msgspec.msgpack.encode(raw)
    marker = msgspec.msgpack.encode(_DEEP)
    return data.replace(marker, b"\x91" * depth + b"\xc0", 1)


@pytest.mark.parametrize("name", sorted(MESSAGES))
@fuzz("protocol.decode.mutated_bytes", 250)
@given(data=st.data())
def test_decode_of_mutated_bytes_rejects_or_validates(name: str, data: st.DataObject) -> None:
    # Prepare: a valid encoding of this type, bit-flipped, truncated, extended, spliced
    blob = data.draw(mutated(ENCODED[name]))
    # Execute / Assert
    record("protocol.decode.mutated_bytes", name, check_decode(blob))


@pytest.mark.parametrize("name", sorted(MESSAGES))
@fuzz("protocol.decode.type_confused", 150)
@given(data=st.data())
def test_decode_of_type_confused_fields_rejects_or_validates(name: str, data: st.DataObject) -> None:
    # Prepare: fields of the wrong type, huge ints, nested junk, another message's tag, 10^4-deep nesting
    raw = data.draw(confused(_raw(MESSAGES[name]), tags=TAGS))
    blob = encode_confused(raw, data.draw(st.sampled_from([10, 200, 3000, 100_000])))
    # Execute / Assert
    record("protocol.decode.type_confused", name, check_decode(blob))


@fuzz("protocol.decode.junk", 300)
@given(
    tag=st.sampled_from(TAGS) | SCALARS,
    version=st.just(p.SCHEMA_VERSION) | SCALARS,
    fields=st.dictionaries(st.text(max_size=12), JUNK, max_size=8),
    raw_bytes=st.binary(max_size=64),
    as_map=st.booleans(),
)
def test_decode_of_junk_rejects_or_validates(
    tag: Any, version: Any, fields: dict[str, Any], raw_bytes: bytes, as_map: bool
) -> None:
    # Prepare: a map with a plausible envelope and junk fields, or plain random bytes
    blob = msgspec.msgpack.encode({"type": tag, "schema_version": version, **fields}) if as_map else raw_bytes
    # Execute / Assert
    record("protocol.decode.junk", "-", check_decode(blob))


# ---------------------------------------------------------------- weights.unpack_weights


TENSOR_NAMES = ["w", "blocks.0.conv.weight", "b", "é", "x" * 200, "__metadata__x"]


@st.composite
def weight_dicts(draw: Draw, min_tensors: int = 0) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.sampled_from(TENSOR_NAMES), min_size=min_tensors, max_size=3, unique=True))
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape).astype(np.float32)
        if values.size and draw(st.booleans()):
            values.reshape(-1)[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -0.0]))
        out[name] = values
    return out


def check_unpack_weights(data: bytes, require_finite: bool) -> str:
    """Unpack `data`: an ArtifactError (or InvalidSlice for non-finite values), or float32 tensors."""
    with no_hang(), bounded_memory(4 * len(data) + (1 << 20)):
        try:
            weights = unpack_weights(data, require_finite=require_finite)
        except ArtifactError as exc:
            assert str(exc)
            return "rejected"
        except InvalidSlice as exc:
            assert require_finite and str(exc)
            return "rejected"
    # Accepted: float32 tensors that pack and unpack to themselves.
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in weights.values())
    if require_finite:
        assert all(np.isfinite(a).all() for a in weights.values())
    again = unpack_weights(pack_weights(weights))
    assert sorted(again) == sorted(weights)
    assert all(again[n].tobytes() == weights[n].tobytes() and again[n].shape == weights[n].shape for n in weights)
    return "accepted"


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: Any, body: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()  # allow_nan: NaN and Infinity literals are junk too
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + body


_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3", "C64", "XX"]


@st.composite
def lying_weights(draw: Draw) -> bytes:
    """Valid packed weights whose header lies: dtype, shape, offsets, metadata, length, checksum."""
    header, body = _split(pack_weights(draw(weight_dicts(min_tensors=1))))
    tensors = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "extra", "drop", "metadata", "junk", "consistent"]))
        name = draw(st.sampled_from(tensors))
        entry = header.get(name)
        if not isinstance(entry, dict):
            entry = header[name] = {}
        if op == "dtype":
            entry["dtype"] = draw(st.sampled_from(_DTYPES) | SCALARS)
        elif op == "shape":
            entry["shape"] = draw(
                st.lists(st.sampled_from([0, 1, 3, -1, 2**31, 2**32, 2**63 - 1, 2**64 - 1]) | SCALARS, max_size=4)
            )
        elif op == "offsets":
            end = len(body)
            entry["data_offsets"] = draw(
                st.lists(st.sampled_from([0, 4, end, end + 4, -1, 2**63, 2**64 - 1]) | SCALARS, max_size=3)
            )
        elif op == "extra":
            header[draw(st.text(max_size=8))] = draw(JSON_JUNK)
        elif op == "drop":
            header.pop(name, None)
        elif op == "metadata":
            header["__metadata__"] = draw(
                st.fixed_dictionaries(
                    {"format": st.just("msfusion-weights-1") | SCALARS, "sha256": st.just(SHA) | SCALARS}
                )
                | JSON_JUNK
            )
        elif op == "junk":
            header = draw(JSON_JUNK)
            break
        else:  # a lie that fits the buffer: another dtype of the same byte size
            shape = entry.get("shape")
            if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= 64 for d in shape)):
                continue  # an earlier lie left no size to fit
            dtype, size = draw(st.sampled_from([("I32", 4), ("U8", 1), ("F16", 2), ("BF16", 2), ("F64", 8)]))
            entry.update(dtype=dtype, shape=[4 * math.prod(shape) // size])
    if isinstance(header, dict) and draw(st.booleans()):
        # Sign the lie, so it gets past the checksum to the checks behind it.
        try:
            loaded = safetensors.numpy.load(_join(header, body))
            metadata = header.get("__metadata__")
            if isinstance(metadata, dict):
                metadata["sha256"] = _digest(loaded)
        except Exception:  # noqa: BLE001 - the lie was unreadable: unpack_weights must say so
            pass
    header_len = draw(st.none() | st.sampled_from([0, 7, 2**32, 2**63, 2**64 - 1]) | st.integers(0, 4096))
    blob = _join(header, body, header_len)
    if draw(st.booleans()):
        blob = blob[: draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob + draw(st.binary(max_size=64))
    return blob


@fuzz("weights.unpack.mutated_bytes", 600)
@given(data=st.data(), require_finite=st.booleans())
def test_unpack_weights_of_mutated_bytes(data: st.DataObject, require_finite: bool) -> None:
    blob = data.draw(mutated(pack_weights(data.draw(weight_dicts()))))
    record("weights.unpack.mutated_bytes", "-", check_unpack_weights(blob, require_finite))


@fuzz("weights.unpack.lying_header", 600)
@given(blob=lying_weights(), require_finite=st.booleans())
def test_unpack_weights_of_lying_headers(blob: bytes, require_finite: bool) -> None:
    record("weights.unpack.lying_header", "-", check_unpack_weights(blob, require_finite))


# ---------------------------------------------------------------- artifacts.unpack_artifact

ARTIFACT_FILES = {"program.pte": bytes(range(256)) * 4, "notes.bin": b"\x00\x01" * 7}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    """A packed valid artifact, and its manifest as a JSON tree."""
    directory = tmp_path_factory.mktemp("artifact")
    for name, content in ARTIFACT_FILES.items():
        (directory / name).write_bytes(content)
    manifest = ArtifactManifest(
        kind=ArtifactKind.EXECUTORCH,
        key="ab" * 32,
        arch="cnn",
        files=describe_files(directory, sorted(ARTIFACT_FILES)),
        params=(TensorInfo("fc.weight", (3, 4)), TensorInfo("fc.bias", (3,))),
        frozen=(TensorInfo("global_ref.fc.weight", (3, 4)),),
        inputs=(TensorInfo("x", (8, 4)), TensorInfo("y", (8,), "int64")),
        optimizer=OptimizerConfig("adamw", weight_decay=0.01),
        loss={"variant": "moon", "mu": 0.1, "tau": 0.5},
        versions={"executorch": "1.5.1"},
        grad_scales={"fc.weight": 0.5},
    )
    write_manifest(directory, manifest)
    return pack_artifact(directory), json.loads(manifest.to_json())


def check_unpack_artifact(blob: bytes) -> str:
    """Unpack `blob` into a fresh folder: an ArtifactError, or exactly the manifest's files and nothing else."""
    with tempfile.TemporaryDirectory() as root:
        destination = Path(root) / "artifact"
        with no_hang(), bounded_memory(4 * len(blob) + (4 << 20)):
            try:
                manifest = unpack_artifact(blob, destination)
            except ArtifactError as exc:
                assert str(exc)
                manifest = None
        assert [q.name for q in Path(root).iterdir()] == ["artifact"], "nothing lands beside the destination"
        if manifest is None:
            return "rejected"
        names = {entry.name for entry in manifest.files}
        assert all("/" not in n and n not in ("", ".", "..", MANIFEST_NAME) for n in names)
        assert {q.name for q in destination.iterdir()} <= names | {MANIFEST_NAME}
        assert all(q.is_file() and not q.is_symlink() for q in destination.iterdir())
        verify_files(destination, manifest)
        return "accepted"


def _member(name: str, content: bytes, kind: str, sparse_size: int = 0) -> bytes:
    """One tar member's header and data blocks; `kind` file, dir, symlink, hardlink, fifo or sparse."""
    info = tarfile.TarInfo(name)
    info.size = len(content) if kind in ("file", "sparse") else 0
    info.type = {
        "file": tarfile.REGTYPE,
        "sparse": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    if kind in ("symlink", "hardlink"):
        info.linkname = "../../../etc/passwd" if kind == "symlink" else "notes.bin"
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"))
    if kind == "sparse":  # an old-GNU sparse file: `content` at the end of `sparse_size` bytes of holes
        block = len(header) - 512
        header[block + 156] = ord("S")
        header[block + 386 : block + 410] = b"%011o\0%011o\0" % (sparse_size - len(content), len(content))
        header[block + 482] = 0
        header[block + 483 : block + 495] = b"%011o\0" % sparse_size
        header[block + 148 : block + 156] = b" " * 8
        header[block + 148 : block + 156] = b"%06o\0 " % sum(header[block : block + 512])
    return bytes(header) + content + b"\0" * (-len(content) % 512)


MEMBER_NAMES = ["program.pte", "notes.bin", MANIFEST_NAME, "..", ".", "", "../x", "/etc/x", "a\x00b", "sub/x", "é"]


@st.composite
def lying_artifacts(draw: Draw, manifest: dict[str, Any]) -> bytes:
    """An artifact tar whose manifest or members lie: names, sizes, checksums, types, order, sparse files."""
    manifest = draw(confused(manifest, junk=JSON_JUNK)) if draw(st.booleans()) else copy.deepcopy(manifest)
    if draw(st.booleans()) and isinstance(manifest.get("files"), list):
        for entry in manifest["files"]:
            if isinstance(entry, dict) and draw(st.booleans()):
                entry[draw(st.sampled_from(["name", "size_bytes", "sha256"]))] = draw(
                    st.sampled_from(MEMBER_NAMES)
                    | st.sampled_from([-1, 0, 2**31, 2**63, 2**64 - 1, 1e999, "14", None])
                    | SCALARS
                )
    text = json.dumps(manifest).encode()
    if draw(st.booleans()):
        text = draw(st.sampled_from([b"[" * 100_000, b"1e999", b"{}", b"\xff\xfe"])) if draw(st.booleans()) else text
    members: list[tuple[str, bytes, str]] = [(MANIFEST_NAME, text, "file")] + [
        (name, content, "file") for name, content in sorted(ARTIFACT_FILES.items())
    ]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "duplicate", "rename", "content", "kind", "swap"]))
        at = draw(st.integers(0, len(members) - 1)) if members else 0
        if not members:
            break
        name, content, kind = members[at]
        if op == "drop":
            del members[at]
        elif op == "duplicate":
            members.insert(at, (name, draw(mutated(content)) if content else content, kind))
        elif op == "rename":
            members[at] = (draw(st.sampled_from(MEMBER_NAMES)), content, kind)
        elif op == "content":
            members[at] = (name, draw(mutated(content)), kind)
        elif op == "kind":
            members[at] = (name, content, draw(st.sampled_from(["dir", "symlink", "hardlink", "fifo", "sparse"])))
        else:
            members[0], members[at] = members[at], members[0]
    sparse_size = draw(st.sampled_from([1 << 12, 1 << 20, 1 << 25]))
    blob = b"".join(_member(n, c, k, sparse_size) for n, c, k in members) + b"\0" * 1024
    return draw(mutated(blob)) if draw(st.booleans()) else blob


@fuzz("artifacts.unpack.mutated_bytes", 400)
@given(data=st.data())
def test_unpack_artifact_of_mutated_bytes(artifact: tuple[bytes, dict[str, Any]], data: st.DataObject) -> None:
    blob = data.draw(mutated(artifact[0]))
    record("artifacts.unpack.mutated_bytes", "-", check_unpack_artifact(blob))


@fuzz("artifacts.unpack.lying_manifest", 400)
@given(data=st.data())
def test_unpack_artifact_of_lying_manifests_and_members(
    artifact: tuple[bytes, dict[str, Any]], data: st.DataObject
) -> None:
    blob = data.draw(lying_artifacts(artifact[1]))
    record("artifacts.unpack.lying_manifest", "-", check_unpack_artifact(blob))


@fuzz("artifacts.manifest.from_json", 300)
@given(data=st.data())
def test_manifest_from_json_of_confused_fields(artifact: tuple[bytes, dict[str, Any]], data: st.DataObject) -> None:
    raw = data.draw(confused(artifact[1], junk=JSON_JUNK))
    text = json.dumps(raw).replace(json.dumps(_DEEP), "[" * 50_000 + "]" * 50_000)
    with no_hang():
        try:
            manifest = ArtifactManifest.from_json(text)
        except ArtifactError as exc:
            assert str(exc)
            record("artifacts.manifest.from_json", "-", "rejected")
            return
    assert ArtifactManifest.from_json(manifest.to_json()) == manifest
    record("artifacts.manifest.from_json", "-", "accepted")


# ---------------------------------------------------------------- bulk: Reassembly, BulkReceiver, receive

BULK_ERRORS = (ProtocolError, ArtifactError, TransferIncomplete)


@st.composite
def transfers(draw: Draw, transfer_id: str = "t-1") -> tuple[bytes, p.BulkRef, list[p.Chunk]]:
    """A payload, its manifest and its chunks (at most 64)."""
    payload = draw(st.binary(max_size=3000))
    chunk_bytes = draw(st.integers(max(1, -(-len(payload) // 64)), max(1, len(payload) + 8)))
    manifest = make_manifest(transfer_id, "slice", payload, chunk_bytes)
    return payload, manifest, list(iter_chunks(manifest, payload))


def _forged(draw: Draw, good: p.Chunk, manifest: p.BulkRef) -> tuple[p.Chunk, str]:
    """A bad variant of `good`, and what is wrong with it."""
    kind = draw(st.sampled_from(["transfer", "n_chunks", "size", "stale_sha", "fresh_sha", "index"]))
    fields: dict[str, Any] = {}
    if kind == "transfer":
        fields["transfer_id"] = draw(st.sampled_from(["t-other", "t-1x", "T-1"]))
    elif kind == "n_chunks":
        fields["n_chunks"] = draw(st.integers(good.index + 1, good.index + 100).filter(lambda n: n != good.n_chunks))
    elif kind == "index":
        fields.update(index=manifest.n_chunks + draw(st.integers(0, 5)), n_chunks=manifest.n_chunks + 10)
    else:
        data = draw(mutated(good.data)) if good.data else draw(st.binary(min_size=1, max_size=8))
        if kind == "size":
            data = data + b"\x00" if len(data) == len(good.data) else data
        fields["data"] = data
        fields["sha256"] = good.sha256 if kind == "stale_sha" else sha256_hex(data)
        if data == good.data:
            kind = "same"  # the mutation undid itself: not a forgery
    return msgspec.structs.replace(good, **fields), kind


def over_the_wire(chunk: p.Chunk, mangle: bytes | None) -> p.Chunk | None:
    """`chunk` encoded and decoded as a receiver gets it (or its `mangle`d bytes); None when decode refuses."""
    try:
        msg = p.decode(mangle if mangle is not None else p.encode(chunk, validate=False))
    except ProtocolError:
        return None
    return msg if isinstance(msg, p.Chunk) else None


@st.composite
def deliveries(draw: Draw, manifest: p.BulkRef, chunks: list[p.Chunk]) -> list[tuple[p.Chunk, str]]:
    """The chunks as a flaky link and a hostile peer deliver them: reordered, duplicated, missing, forged."""
    out: list[tuple[p.Chunk, str]] = []
    for index in draw(st.permutations(range(len(chunks)))):
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))):  # missing, once, or redelivered
            if draw(st.integers(0, 5)) == 0:
                out.append(_forged(draw, chunks[index], manifest))
            out.append((chunks[index], "good"))
    return draw(st.permutations(out)) if draw(st.booleans()) else out


@fuzz("bulk.reassembly.deliveries", 800)
@given(data=st.data())
def test_reassembly_gives_exactly_the_payload_or_a_reason(data: st.DataObject) -> None:
    # Prepare
    payload, manifest, chunks = data.draw(transfers())
    delivered = data.draw(deliveries(manifest, chunks))
    reassembly = Reassembly(manifest)
    accepted: dict[int, str] = {}  # index -> kind of the first chunk stored there
    # Execute: every chunk through the wire, some of them mangled on the way
    with no_hang():
        for chunk, kind in delivered:
            mangle = data.draw(st.none() | mutated(p.encode(chunk, validate=False), max_ops=2))
            received = over_the_wire(chunk, mangle)
            if received is None:
                continue
            if mangle is not None:
                kind = "good" if received == chunk else "mangled"
            try:
                if reassembly.add(received):
                    accepted[received.index] = kind
            except ArtifactError as exc:
                assert str(exc)
        try:
            out = reassembly.payload()
        except TransferIncomplete as exc:
            outcome = "incomplete"
            assert exc.missing and set(exc.missing).isdisjoint(accepted)
        except ArtifactError:
            outcome = "rejected"
            assert any(kind not in ("good", "same") for kind in accepted.values()), "good chunks make good payloads"
        else:
            outcome = "complete"
            assert out == payload
    # Assert: every chunk delivered intact, and no forgery stored: the payload, exactly
    if set(accepted) == set(range(manifest.n_chunks)) and set(accepted.values()) <= {"good", "same"}:
        assert outcome == "complete"
    record("bulk.reassembly.deliveries", "-", outcome)


@st.composite
def lying_manifests(draw: Draw, manifest: p.BulkRef) -> bytes:
    """A SliceResult whose manifest lies about total_bytes, n_chunks, chunk_bytes or sha256."""
    raw = _raw(manifest)
    for field in draw(st.sets(st.sampled_from(["total_bytes", "n_chunks", "chunk_bytes", "sha256"]), min_size=1)):
        if field == "sha256":
            raw[field] = draw(st.sampled_from([SHA, "0" * 64, raw[field].upper()]) | SCALARS)
            continue
        raw[field] = draw(
            st.sampled_from([0, 1, 2, 4095, 1 << 20, (1 << 20) + 1, 2**31, 2**40, 2**63 - 1, 2**64 - 1])
            | st.integers(0, 2 * max(1, manifest.total_bytes))
            | SCALARS
        )
    if draw(st.booleans()) and all(isinstance(raw.get(f), int) and raw[f] > 0 for f in ("total_bytes", "chunk_bytes")):
        raw["n_chunks"] = -(-raw["total_bytes"] // raw["chunk_bytes"])  # lie consistently: get past the manifest check
    result = _raw(MESSAGES["SliceResult"])
    result["weights"] = raw
    return msgspec.msgpack.encode(result)


@fuzz("bulk.reassembly.lying_manifest", 500)
@given(data=st.data())
def test_a_lying_manifest_never_sizes_an_allocation(data: st.DataObject) -> None:
    # Prepare: the manifest arrives in a SliceResult; the chunks are cut by the truth or by the lie
    payload, manifest, chunks = data.draw(transfers())
    with no_hang():
        try:
            lie = p.decode(data.draw(lying_manifests(manifest)))
        except ProtocolError:
            record("bulk.reassembly.lying_manifest", "-", "rejected")
            return
    assert isinstance(lie, p.SliceResult)
    lying = lie.weights
    if data.draw(st.booleans()):
        step = lying.chunk_bytes
        pieces = [payload[i * step : (i + 1) * step] for i in range(min(lying.n_chunks, len(payload) // step + 1))]
        chunks = [
            p.Chunk(transfer_id=lying.transfer_id, index=i, n_chunks=lying.n_chunks, sha256=sha256_hex(c), data=c)
            for i, c in enumerate(pieces)
        ]
    # Execute: memory stays O(payload) whatever the manifest claims
    with no_hang(), bounded_memory(8 * len(payload) + (2 << 20)):
        receiver = BulkReceiver()
        try:
            out = receiver.expect(lying)
            for chunk in chunks:
                try:
                    out = receiver.feed(chunk) or out
                except ArtifactError as exc:
                    assert str(exc)
            if out is None:
                Reassembly(lying).payload()
        except BULK_ERRORS as exc:
            assert str(exc)
            outcome = "rejected"
        else:
            outcome = "complete"
    # Assert: a complete payload is the one sent, under a manifest that told the truth about it
    if outcome == "complete":
        assert out == payload and (lying.total_bytes, lying.sha256) == (manifest.total_bytes, manifest.sha256)
    record("bulk.reassembly.lying_manifest", "-", outcome)


@fuzz("bulk.receiver.interleaved", 300)
@given(data=st.data())
def test_bulk_receiver_of_interleaved_orphaned_transfers(data: st.DataObject) -> None:
    # Prepare: three transfers whose chunks interleave; each manifest is announced at a random moment
    sent = [data.draw(transfers(f"t-{i}")) for i in range(3)]
    events: list[tuple[str, Any]] = [("chunk", c) for _, _, chunks in sent for c in chunks]
    events += [("chunk", chunk) for chunk, _ in (_forged(data.draw, c, m) for _, m, cs in sent for c in cs[:1])]
    events = data.draw(st.permutations(events))
    for _, manifest, _ in sent:
        events.insert(data.draw(st.integers(0, len(events))), ("expect", manifest))
    receiver = BulkReceiver(max_orphan_bytes=data.draw(st.sampled_from([0, 100, 1 << 20])))
    done: dict[str, bytes] = {}
    # Execute
    with no_hang():
        for what, value in events:
            try:
                out = receiver.expect(value) if what == "expect" else receiver.feed(value)
            except ArtifactError as exc:
                assert str(exc)
                continue
            if out is not None:
                assert value.transfer_id not in done, "a transfer completes once"
                done[value.transfer_id] = out
    # Assert: whatever completed is exactly what was sent
    for payload, manifest, _ in sent:
        if manifest.transfer_id in done:
            assert done[manifest.transfer_id] == payload
    record("bulk.receiver.interleaved", "-", f"{len(done)}-of-3")


class ScriptedTransport:
    """A transport whose events are a fixed script (chunks, other topics, junk); it runs dry at the end."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events  # shared: a served request appends to it
        self.put_back_events: list[Any] = []

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> Any:
        return None

    def wait_published(self, info: Any, timeout_s: float) -> None:
        return None

    def get(self, timeout_s: float | None = None) -> Any:
        return self.events.pop(0) if self.events else None

    def put_back(self, events: Any) -> None:
        self.put_back_events.extend(events)


@fuzz("bulk.receive.scripted", 250)
@given(data=st.data())
def test_receive_ends_with_the_payload_or_a_reason(data: st.DataObject) -> None:
    # Prepare: the chunks, duplicated, missing, forged and mangled, among other topics' messages
    payload, manifest, chunks = data.draw(transfers())
    script: list[Any] = []
    clean = True  # every chunk delivered as sent (some perhaps missing or twice)
    for chunk, kind in data.draw(deliveries(manifest, chunks)):
        blob = p.encode(chunk, validate=False)
        wire = data.draw(st.just(blob) | mutated(blob, max_ops=2))
        clean = clean and kind in ("good", "same") and wire == blob
        script.append(Received("bulk/t-1", wire))
        if data.draw(st.integers(0, 7)) == 0:
            script.append(Received("other/topic", blob))
    served = data.draw(st.booleans())  # the sender answers requests for missing chunks

    def request_missing(missing: list[int]) -> None:
        if served:
            script.extend(Received("bulk/t-1", p.encode(chunks[i])) for i in missing if 0 <= i < len(chunks))

    transport = ScriptedTransport(script)
    # Execute: a short stall window, so a dry script ends in seconds at worst
    with no_hang(10):
        try:
            out = receive(transport, manifest, "bulk/t-1", timeout_s=0.001, request_missing=request_missing, retries=2)
        except (ArtifactError, TransferIncomplete) as exc:
            assert str(exc)
            outcome = "rejected"
        else:
            outcome = "complete"
            assert out == payload
    # Assert: other topics' messages and other transfers' chunks are handed back; clean chunks and a
    # serving sender make the payload
    for event in transport.put_back_events:
        assert event.topic == "other/topic" or p.decode(event.payload).transfer_id != "t-1"
    if served and clean:
        assert outcome == "complete"
    record("bulk.receive.scripted", "-", outcome)


# ---------------------------------------------------------------- edge_runtime.config: device.toml

GOOD_TOML = """\
device_id = "dev003"
run_id = "fmnist"
broker = "mqtt://192.168.1.10:1883"
username = "dev003"
password = "p\\"w"
state_dir = "/var/lib/msfusion/state"
memory_budget_bytes = 536870912
backends = ["ort"]
max_width_ratio = 0.5
heartbeat_s = 5.0
keepalive_s = 10
stall_s = 5.0
threads = 1

[data]
path = "/srv/photos"
format = "images"
channels = 3
image_size = 32
"""

CONFIG_STRINGS = [
    "mqtt://[",
    "mqtt://[::1]:x",
    "mqtt://h:99999",
    "mqtt://h:-1",
    "mqtts://h:8883",
    "ftp://h",
    "mqtt://",
    "~nosuchuser-msfusion/x",
    "~",
    "/dev/null",
    "dev\n003",
    "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    "00" * 32,
    "5",
    "3.1.1",
    "ort",
    "executorch",
]


def toml_value(value: Any) -> str:
    """`value` as TOML (None has no TOML: an empty string stands in; bytes become text)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_table(table: dict[str, Any]) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, sub in table.items():
        if isinstance(sub, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def check_device_config(text: bytes) -> str:
    """Load a device.toml of `text`: a ConfigError with a reason, or a config whose ids are safe."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "device.toml"
        path.write_bytes(text)
        with no_hang():
            try:
                config = load_device_config(path)
            except ConfigError as exc:
                assert str(exc)
                return "rejected"
    assert re.match(p.ID_PATTERN, config.device_id) and re.match(p.ID_PATTERN, config.run_id)
    assert isinstance(config.memory_budget_bytes, int) and config.memory_budget_bytes >= 1
    return "accepted"


@fuzz("config.device_toml.mutated_bytes", 400)
@given(data=st.data())
def test_device_config_of_mutated_toml(data: st.DataObject) -> None:
    text = data.draw(mutated(GOOD_TOML.encode()))
    record("config.device_toml.mutated_bytes", "-", check_device_config(text))


@fuzz("config.device_toml.type_confused", 400)
@given(data=st.data())
def test_device_config_of_type_confused_values(data: st.DataObject) -> None:
    # Prepare: keys replaced, dropped, added; values of the wrong type; strings that break URLs and paths
    import tomllib

    table = data.draw(confused(tomllib.loads(GOOD_TOML)))
    for _ in range(data.draw(st.integers(0, 2))):
        key = data.draw(st.sampled_from(sorted(tomllib.loads(GOOD_TOML)) + ["path", "format", "ca_cert", "mqtt"]))
        target = table["data"] if key in ("path", "format") and isinstance(table.get("data"), dict) else table
        target[key] = data.draw(st.sampled_from(CONFIG_STRINGS) | JUNK)
    text = toml_table(table).replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000)
    # Execute / Assert
    record("config.device_toml.type_confused", "-", check_device_config(text.encode()))


# ---------------------------------------------------------------- data reports (Registration.data)

MODELS = {
    "images": ModelInputs("classification", (1, 28, 28), num_classes=10),
    "text": ModelInputs("lm", (), vocab_size=8, context=16),
}


@fuzz("data.report.combine", 400)
@given(data=st.data())
def test_a_devices_data_report_is_judged_with_a_reason(data: st.DataObject) -> None:
    # Prepare: a Registration whose data report lies or is type-confused; it goes through decode first
    report = _raw(_report())
    if data.draw(st.booleans()):
        report.update(task="lm", format="text", sample_shape=[], char_counts={"a": 5, "b": 2}, class_counts={})
    raw = data.draw(confused(report))
    if data.draw(st.booleans()) and isinstance(raw.get("class_counts"), dict):
        raw["class_counts"][data.draw(st.sampled_from(["²", "٣", "9" * 200, "10", "-1", " 1", "1_0"]))] = 3
    if data.draw(st.booleans()):
        raw["channel_stats"] = {
            "count": data.draw(st.sampled_from([0, 1, 2**64 - 1])),
            "mean": data.draw(st.lists(st.floats(), max_size=3)),
            "m2": data.draw(st.lists(st.floats(), max_size=3)),
        }
    registration = _raw(MESSAGES["Registration"])
    registration["data"] = raw
    model = MODELS[data.draw(st.sampled_from(sorted(MODELS)))]
    try:
        decoded = p.decode(encode_confused(registration, 3000))
    except ProtocolError:
        record("data.report.combine", "-", "rejected-on-decode")
        return
    assert isinstance(decoded, p.Registration) and decoded.data is not None
    # Execute: the coordinator judges the report and pools it with a good one
    with no_hang():
        reason = check_report(decoded.data, model)
        assert isinstance(reason, str)
        try:
            prep = combine_reports([decoded.data, p.DataReport(**_good_report_fields(model))], model)
        except DataError as exc:
            assert str(exc)
            record("data.report.combine", "-", "rejected")
            return
    # Assert: the preprocessing it agreed is valid on the wire (it goes out in every task)
    msgspec.convert(_raw(prep), p.Preprocessing)
    record("data.report.combine", "-", "accepted" if not reason else "set-aside")


def _good_report_fields(model: ModelInputs) -> dict[str, Any]:
    if model.task == "lm":
        return {"format": "text", "task": "lm", "n_samples": 7, "sample_shape": [], "char_counts": {"a": 5, "b": 2}}
    return {
        "format": "images",
        "task": "classification",
        "n_samples": 10,
        "sample_shape": list(model.sample_shape),
        "channel_stats": p.ChannelStats(count=7840, mean=[0.3], m2=[700.0]),
        "class_counts": {"1": 10},
    }


# ---------------------------------------------------------------- the figures


def test_every_wire_target_ran_its_budget() -> None:
    """Runs last in this module: every fuzz target above ran the examples its profile asked for."""
    counts = summary()
    if not counts:
        pytest.skip("no fuzz target ran in this session")
    assert not shortfalls(""), shortfalls("")
