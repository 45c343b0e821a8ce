"""Fuzzing what crosses the wire: every decoder, the chunk reassembler, the device config, data reports.

Thousands of malformed, truncated, oversized, mutated and type-confused inputs
(`tests/fuzzing.py` sets how many: MSFUSION_FUZZ_PROFILE=ci|bench), each built
by a seeded `random.Random` from one hypothesis-drawn seed. Each one
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
import random
import re
import struct
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import safetensors.numpy
import tomllib
from fuzzing import SEEDS, bounded_memory, fuzz, junk, mutate, no_hang, record, scalar, shortfalls, summary
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

SHA = "ab" * 32
TAGS = sorted(t.__struct_config__.tag for t in p.MESSAGE_TYPES)
_DEEP = "\x00deep-nesting-goes-here\x00"  # replaced, after encoding, by thousands of nested arrays


# ---------------------------------------------------------------- protocol.decode


def _ref(kind: p.BulkKind, total: int = 3_000_000) -> p.BulkRef:
    chunk = 1 << 20
    return p.BulkRef(
        transfer_id=f"t-{kind}",
        kind=kind,
        total_bytes=total,
        sha256=SHA,
        n_chunks=-(-total // chunk),
        chunk_bytes=chunk,
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


def confuse(rng: random.Random, raw: Any, *, tags: list[str] | None = None, json_safe: bool = False) -> Any:
    """A copy of `raw` (a tree of builtins) with 1..3 fields replaced, deleted, added, retagged or nested deep."""
    raw = copy.deepcopy(raw)
    deep = False
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["replace", "replace", "delete", "add", "retag", "deep"])
        paths = _paths(raw)
        if op in ("replace", "deep", "delete") and not paths:
            op = "add"
        if op == "replace":
            path = rng.choice(paths)
            _get(raw, path[:-1])[path[-1]] = junk(rng, json_safe)
        elif op == "delete":
            path = rng.choice(paths)
            del _get(raw, path[:-1])[path[-1]]
        elif op == "add":
            dicts = [q for q in [(), *paths] if isinstance(_get(raw, q), dict)]
            _get(raw, rng.choice(dicts))[str(scalar(rng, True))] = junk(rng, json_safe)
        elif op == "retag" and tags and isinstance(raw, dict):
            raw["type"] = rng.choice(tags) if rng.random() < 0.7 else scalar(rng, True)
        elif op == "deep" and not deep:
            path = rng.choice(paths)
            _get(raw, path[:-1])[path[-1]] = _DEEP
            deep = True
    return raw


def encode_confused(raw: Any, depth: int) -> bytes:
    """MessagePack of `raw`, the `_DEEP` marker (if any) replaced by `depth` nested one-element arrays."""
    data = msgspec.msgpack.encode(raw)
    marker = msgspec.msgpack.encode(_DEEP)
    return data.replace(marker, b"\x91" * depth + b"\xc0", 1)


@pytest.mark.parametrize("name", sorted(MESSAGES))
@fuzz("protocol.decode.mutated_bytes", 300)
@given(seed=SEEDS)
def test_decode_of_mutated_bytes_rejects_or_validates(name: str, seed: int) -> None:
    # Prepare: a valid encoding of this type, bit-flipped, truncated, extended, spliced
    blob = mutate(random.Random(seed), ENCODED[name])
    # Execute / Assert
    record("protocol.decode.mutated_bytes", name, check_decode(blob))


@pytest.mark.parametrize("name", sorted(MESSAGES))
@fuzz("protocol.decode.type_confused", 200)
@given(seed=SEEDS)
def test_decode_of_type_confused_fields_rejects_or_validates(name: str, seed: int) -> None:
    # Prepare: fields of the wrong type, huge ints, nested junk, another message's tag, 10^5-deep nesting
    rng = random.Random(seed)
    raw = confuse(rng, _raw(MESSAGES[name]), tags=TAGS)
    blob = encode_confused(raw, rng.choice([10, 200, 3000, 100_000]))
    # Execute / Assert
    record("protocol.decode.type_confused", name, check_decode(blob))


@fuzz("protocol.decode.junk", 400)
@given(seed=SEEDS)
def test_decode_of_junk_rejects_or_validates(seed: int) -> None:
    # Prepare: a map with a plausible envelope and junk fields, or plain random bytes
    rng = random.Random(seed)
    if rng.random() < 0.5:
        tag = rng.choice(TAGS) if rng.random() < 0.8 else scalar(rng)
        version = p.SCHEMA_VERSION if rng.random() < 0.8 else scalar(rng)
        fields = {str(scalar(rng, True)): junk(rng) for _ in range(rng.randint(0, 8))}
        blob = msgspec.msgpack.encode({"type": tag, "schema_version": version, **fields})
    else:
        blob = rng.randbytes(rng.randint(0, 64))
    # Execute / Assert
    record("protocol.decode.junk", "-", check_decode(blob))


# ---------------------------------------------------------------- weights.unpack_weights


TENSOR_NAMES = ["w", "blocks.0.conv.weight", "b", "é", "x" * 200, "__metadata__x"]


def weight_dict(rng: random.Random, min_tensors: int = 0) -> dict[str, np.ndarray]:
    """A few small float32 tensors, some holding NaN, inf or float32's largest value."""
    out = {}
    for name in rng.sample(TENSOR_NAMES, rng.randint(min_tensors, 3)):
        shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
        values = np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype(np.float32)
        if values.size and rng.random() < 0.5:
            values.reshape(-1)[0] = rng.choice([np.nan, np.inf, -np.inf, 3.4e38, -0.0])
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


def lying_weights(rng: random.Random) -> bytes:
    """Valid packed weights whose header lies: dtype, shape, offsets, metadata, length, checksum."""
    header, body = _split(pack_weights(weight_dict(rng, min_tensors=1)))
    tensors = sorted(k for k in header if k != "__metadata__")
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["dtype", "shape", "offsets", "extra", "drop", "metadata", "junk", "consistent"])
        entry = header.get(name := rng.choice(tensors))
        if not isinstance(entry, dict):
            entry = header[name] = {}
        if op == "dtype":
            entry["dtype"] = rng.choice(_DTYPES) if rng.random() < 0.8 else scalar(rng, True)
        elif op == "shape":
            entry["shape"] = [
                rng.choice([0, 1, 3, -1, 2**31, 2**32, 2**63 - 1, 2**64 - 1])
                if rng.random() < 0.8
                else scalar(rng, True)
                for _ in range(rng.randint(0, 4))
            ]
        elif op == "offsets":
            end = len(body)
            entry["data_offsets"] = [
                rng.choice([0, 4, end, end + 4, -1, 2**63, 2**64 - 1]) if rng.random() < 0.8 else scalar(rng, True)
                for _ in range(rng.randint(0, 3))
            ]
        elif op == "extra":
            header[str(scalar(rng, True))] = junk(rng, json_safe=True)
        elif op == "drop":
            header.pop(name, None)
        elif op == "metadata":
            header["__metadata__"] = (
                {"format": rng.choice(["msfusion-weights-1", scalar(rng, True)]), "sha256": rng.choice([SHA, 5, None])}
                if rng.random() < 0.7
                else junk(rng, json_safe=True)
            )
        elif op == "junk":
            header = junk(rng, json_safe=True)
            break
        else:  # a lie that fits the buffer: another dtype of the same byte size
            shape = entry.get("shape")
            if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= 64 for d in shape)):
                continue  # an earlier lie left no size to fit
            dtype, size = rng.choice([("I32", 4), ("U8", 1), ("F16", 2), ("BF16", 2), ("F64", 8)])
            entry.update(dtype=dtype, shape=[4 * math.prod(shape) // size])
    if isinstance(header, dict) and rng.random() < 0.5:
        # Sign the lie, so it gets past the checksum to the checks behind it.
        try:
            with warnings.catch_warnings():  # the digest casts whatever the lie holds (complex too) to float32
                warnings.simplefilter("ignore")
                loaded = safetensors.numpy.load(_join(header, body))
                digest = _digest(loaded)
            metadata = header.get("__metadata__")
            if isinstance(metadata, dict):
                metadata["sha256"] = digest
        except Exception:  # noqa: BLE001 - the lie was unreadable: unpack_weights must say so
            pass
    header_len = rng.choice([None, None, None, 0, 7, 2**32, 2**63, 2**64 - 1, rng.randint(0, 4096)])
    blob = _join(header, body, header_len)
    if rng.random() < 0.3:
        blob = blob[: rng.randint(0, len(blob))] if rng.random() < 0.5 else blob + rng.randbytes(rng.randint(1, 64))
    return blob


@fuzz("weights.unpack.mutated_bytes", 500)
@given(seed=SEEDS, require_finite=st.booleans())
def test_unpack_weights_of_mutated_bytes(seed: int, require_finite: bool) -> None:
    rng = random.Random(seed)
    blob = mutate(rng, pack_weights(weight_dict(rng)))
    record("weights.unpack.mutated_bytes", "-", check_unpack_weights(blob, require_finite))


@fuzz("weights.unpack.lying_header", 500)
@given(seed=SEEDS, require_finite=st.booleans())
def test_unpack_weights_of_lying_headers(seed: int, require_finite: bool) -> None:
    blob = lying_weights(random.Random(seed))
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
FILE_LIES = [-1, 0, 2**31, 2**63, 2**64 - 1, 1e999, "14", None, "0" * 64]


def lying_artifact(rng: random.Random, manifest: dict[str, Any]) -> bytes:
    """An artifact tar whose manifest or members lie: names, sizes, checksums, types, order, sparse files."""
    manifest = confuse(rng, manifest, json_safe=True) if rng.random() < 0.5 else copy.deepcopy(manifest)
    if rng.random() < 0.5 and isinstance(manifest.get("files"), list):
        for entry in manifest["files"]:
            if isinstance(entry, dict) and rng.random() < 0.5:
                entry[rng.choice(["name", "size_bytes", "sha256"])] = rng.choice(MEMBER_NAMES + FILE_LIES)
    text = json.dumps(manifest).encode()
    if rng.random() < 0.2:
        text = rng.choice([b"[" * 100_000, b"1e999", b"{}", b"\xff\xfe"])
    members: list[tuple[str, bytes, str]] = [(MANIFEST_NAME, text, "file")] + [
        (name, content, "file") for name, content in sorted(ARTIFACT_FILES.items())
    ]
    for _ in range(rng.randint(0, 3)):
        if not members:
            break
        at = rng.randrange(len(members))
        name, content, kind = members[at]
        op = rng.choice(["drop", "duplicate", "rename", "content", "kind", "swap"])
        if op == "drop":
            del members[at]
        elif op == "duplicate":
            members.insert(at, (name, mutate(rng, content) if content else content, kind))
        elif op == "rename":
            members[at] = (rng.choice(MEMBER_NAMES), content, kind)
        elif op == "content":
            members[at] = (name, mutate(rng, content), kind)
        elif op == "kind":
            members[at] = (name, content, rng.choice(["dir", "symlink", "hardlink", "fifo", "sparse"]))
        else:
            members[0], members[at] = members[at], members[0]
    sparse_size = rng.choice([1 << 12, 1 << 20, 1 << 25])
    blob = b"".join(_member(n, c, k, sparse_size) for n, c, k in members) + b"\0" * 1024
    return mutate(rng, blob) if rng.random() < 0.3 else blob


@fuzz("artifacts.unpack.mutated_bytes", 300)
@given(seed=SEEDS)
def test_unpack_artifact_of_mutated_bytes(artifact: tuple[bytes, dict[str, Any]], seed: int) -> None:
    blob = mutate(random.Random(seed), artifact[0])
    record("artifacts.unpack.mutated_bytes", "-", check_unpack_artifact(blob))


@fuzz("artifacts.unpack.lying_manifest", 400)
@given(seed=SEEDS)
def test_unpack_artifact_of_lying_manifests_and_members(artifact: tuple[bytes, dict[str, Any]], seed: int) -> None:
    blob = lying_artifact(random.Random(seed), artifact[1])
    record("artifacts.unpack.lying_manifest", "-", check_unpack_artifact(blob))


@fuzz("artifacts.manifest.from_json", 300)
@given(seed=SEEDS)
def test_manifest_from_json_of_confused_fields(artifact: tuple[bytes, dict[str, Any]], seed: int) -> None:
    raw = confuse(random.Random(seed), artifact[1], json_safe=True)
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


def transfer(rng: random.Random, transfer_id: str = "t-1") -> tuple[bytes, p.BulkRef, list[p.Chunk]]:
    """A payload (0..3000 bytes), its manifest and its chunks (at most 16)."""
    payload = rng.randbytes(rng.choice([0, 1, rng.randint(0, 3000)]))
    chunk_bytes = rng.randint(max(1, -(-len(payload) // 16)), max(1, len(payload) + 8))
    manifest = make_manifest(transfer_id, "slice", payload, chunk_bytes)
    return payload, manifest, list(iter_chunks(manifest, payload))


def forge(rng: random.Random, good: p.Chunk, manifest: p.BulkRef) -> tuple[p.Chunk, str]:
    """A bad variant of `good`, and what is wrong with it."""
    kind = rng.choice(["transfer", "n_chunks", "size", "stale_sha", "fresh_sha", "index"])
    fields: dict[str, Any] = {}
    if kind == "transfer":
        fields["transfer_id"] = rng.choice(["t-other", "t-1x", "T-1"])
    elif kind == "n_chunks":
        fields["n_chunks"] = good.n_chunks + rng.randint(1, 100)
    elif kind == "index":
        fields.update(index=manifest.n_chunks + rng.randint(0, 5), n_chunks=manifest.n_chunks + 10)
    else:
        data = mutate(rng, good.data) if good.data else rng.randbytes(rng.randint(1, 8))
        if kind == "size" and len(data) == len(good.data):
            data += b"\x00"
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


def deliveries(rng: random.Random, manifest: p.BulkRef, chunks: list[p.Chunk]) -> list[tuple[p.Chunk, str]]:
    """The chunks as a flaky link and a hostile peer deliver them: reordered, duplicated, missing, forged."""
    out: list[tuple[p.Chunk, str]] = []
    for index in rng.sample(range(len(chunks)), len(chunks)):
        for _ in range(rng.choice([0, 1, 1, 1, 1, 2, 3])):  # missing, once, or redelivered
            if rng.random() < 0.15:
                out.append(forge(rng, chunks[index], manifest))
            out.append((chunks[index], "good"))
    if rng.random() < 0.5:
        rng.shuffle(out)
    return out


@fuzz("bulk.reassembly.deliveries", 800)
@given(seed=SEEDS)
def test_reassembly_gives_exactly_the_payload_or_a_reason(seed: int) -> None:
    # Prepare
    rng = random.Random(seed)
    payload, manifest, chunks = transfer(rng)
    delivered = deliveries(rng, manifest, chunks)
    reassembly = Reassembly(manifest)
    accepted: dict[int, str] = {}  # index -> kind of the chunk stored there
    # Execute: every chunk through the wire, some of them mangled on the way
    with no_hang():
        for chunk, kind in delivered:
            mangle = mutate(rng, p.encode(chunk, validate=False), max_ops=2) if rng.random() < 0.2 else None
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


SIZES = [0, 1, 2, 4095, 1 << 20, (1 << 20) + 1, 2**31, 2**34, 2**40, 2**63 - 1, 2**64 - 1]


def lying_manifest(rng: random.Random, manifest: p.BulkRef) -> bytes:
    """A SliceResult whose manifest lies about total_bytes, n_chunks, chunk_bytes or sha256."""
    raw = _raw(manifest)
    for field in rng.sample(["total_bytes", "n_chunks", "chunk_bytes", "sha256"], rng.randint(1, 4)):
        if field == "sha256":
            raw[field] = rng.choice([SHA, "0" * 64, raw[field].upper(), scalar(rng)])
        else:
            roll = rng.random()
            raw[field] = (
                rng.choice(SIZES)
                if roll < 0.6
                else rng.randint(0, 2 * max(1, manifest.total_bytes))
                if roll < 0.9
                else scalar(rng)
            )
    if rng.random() < 0.8 and all(type(raw.get(f)) is int and raw[f] > 0 for f in ("total_bytes", "chunk_bytes")):
        raw["n_chunks"] = -(-raw["total_bytes"] // raw["chunk_bytes"])  # lie consistently: past the manifest check
    result = _raw(MESSAGES["SliceResult"])
    result["weights"] = raw
    return msgspec.msgpack.encode(result)


@fuzz("bulk.reassembly.lying_manifest", 500)
@given(seed=SEEDS)
def test_a_lying_manifest_never_sizes_an_allocation(seed: int) -> None:
    # Prepare: the manifest arrives in a SliceResult; the chunks are cut by the truth or by the lie
    rng = random.Random(seed)
    payload, manifest, chunks = transfer(rng)
    with no_hang():
        try:
            lie = p.decode(lying_manifest(rng, manifest))
        except ProtocolError:
            record("bulk.reassembly.lying_manifest", "-", "rejected-on-decode")
            return
    assert isinstance(lie, p.SliceResult)
    lying = lie.weights
    if rng.random() < 0.5:
        step = lying.chunk_bytes
        pieces = [payload[i * step : (i + 1) * step] for i in range(min(lying.n_chunks, len(payload) // step + 1))]
        chunks = [
            p.Chunk(transfer_id=lying.transfer_id, index=i, n_chunks=lying.n_chunks, sha256=sha256_hex(c), data=c)
            for i, c in enumerate(pieces)
        ]
    # Execute: memory stays O(payload) whatever the manifest claims
    out = None
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
    # Assert: a complete payload is the one sent, under a manifest that told the truth about it
    if out is not None:
        assert out == payload and (lying.total_bytes, lying.sha256) == (manifest.total_bytes, manifest.sha256)
    record("bulk.reassembly.lying_manifest", "-", "complete" if out is not None else "rejected")


@fuzz("bulk.receiver.interleaved", 300)
@given(seed=SEEDS)
def test_bulk_receiver_of_interleaved_orphaned_transfers(seed: int) -> None:
    # Prepare: three transfers whose chunks interleave; each manifest is announced at a random moment
    rng = random.Random(seed)
    sent = [transfer(rng, f"t-{i}") for i in range(3)]
    events: list[tuple[str, Any]] = [("chunk", c) for _, _, chunks in sent for c in chunks]
    events += [("chunk", forge(rng, chunks[0], manifest)[0]) for _, manifest, chunks in sent]
    rng.shuffle(events)
    for _, manifest, _ in sent:
        events.insert(rng.randint(0, len(events)), ("expect", manifest))
    receiver = BulkReceiver(max_orphan_bytes=rng.choice([0, 100, 1 << 20]))
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
    """A transport whose events are a script (chunks, other topics, junk); it runs dry at the end."""

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
@given(seed=SEEDS)
def test_receive_ends_with_the_payload_or_a_reason(seed: int) -> None:
    # Prepare: the chunks, duplicated, missing, forged and mangled, among other topics' messages
    rng = random.Random(seed)
    payload, manifest, chunks = transfer(rng)
    script: list[Any] = []
    clean = True  # every chunk delivered as sent (some perhaps missing or twice)
    for chunk, kind in deliveries(rng, manifest, chunks):
        blob = p.encode(chunk, validate=False)
        wire = mutate(rng, blob, max_ops=2) if rng.random() < 0.2 else blob
        clean = clean and kind in ("good", "same") and wire == blob
        script.append(Received("bulk/t-1", wire))
        if rng.random() < 0.1:
            script.append(Received("other/topic", blob))
    served = rng.random() < 0.5  # the sender answers requests for missing chunks

    def request_missing(missing: list[int]) -> None:
        if served:
            script.extend(Received("bulk/t-1", p.encode(chunks[i])) for i in missing if 0 <= i < len(chunks))

    transport = ScriptedTransport(script)
    # Execute: a short stall window, so a dry script ends within milliseconds
    with no_hang():
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
    "mqtt://[zz]:1",
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
    "zz" * 32,
    "5",
    "3.1.1",
    "ort",
    "executorch",
]
CONFIG_KEYS = sorted(tomllib.loads(GOOD_TOML)) + ["path", "format", "ca_cert", "tls_cert", "tls_key", "mqtt"]
CONFIG_KEYS += ["task_signing_public_key", "result_key", "board"]


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
    # Accepted: every value of the type the daemon reads it as (a bool is no count, NaN no duration)
    assert re.match(p.ID_PATTERN, config.device_id) and re.match(p.ID_PATTERN, config.run_id)
    assert all(isinstance(getattr(config, k), str) for k in ("broker", "board", "mqtt", "ca_cert", "result_key"))
    assert all(isinstance(getattr(config, k), (str, type(None))) for k in ("username", "password"))
    assert all(type(getattr(config, k)) is int for k in ("memory_budget_bytes", "keepalive_s", "threads"))
    durations = (config.heartbeat_s, config.stall_s, config.max_width_ratio or 1.0)
    assert all(type(v) in (int, float) and math.isfinite(v) for v in durations)
    assert config.backends and all(isinstance(b, str) for b in config.backends)
    if config.data is not None:
        assert type(config.data.channels) is int and type(config.data.image_size) is int
    return "accepted"


@fuzz("config.device_toml.mutated_bytes", 400)
@given(seed=SEEDS)
def test_device_config_of_mutated_toml(seed: int) -> None:
    text = mutate(random.Random(seed), GOOD_TOML.encode())
    record("config.device_toml.mutated_bytes", "-", check_device_config(text))


@fuzz("config.device_toml.type_confused", 400)
@given(seed=SEEDS)
def test_device_config_of_type_confused_values(seed: int) -> None:
    # Prepare: keys replaced, dropped, added; values of the wrong type; strings that break URLs and paths
    rng = random.Random(seed)
    table = confuse(rng, tomllib.loads(GOOD_TOML))
    for _ in range(rng.randint(0, 2)):
        key = rng.choice(CONFIG_KEYS)
        target = table["data"] if key in ("path", "format") and isinstance(table.get("data"), dict) else table
        target[key] = rng.choice(CONFIG_STRINGS) if rng.random() < 0.6 else junk(rng)
    text = toml_table(table).replace(json.dumps(_DEEP), "[" * 5000 + "]" * 5000)
    # Execute / Assert
    record("config.device_toml.type_confused", "-", check_device_config(text.encode()))


# ---------------------------------------------------------------- data reports (Registration.data)

MODELS = {
    "images": ModelInputs("classification", (1, 28, 28), num_classes=10),
    "text": ModelInputs("lm", (), vocab_size=8, context=16),
}
CLASS_NAMES = ["²", "٣", "9" * 200, "10", "-1", " 1", "1_0", "0", "cat"]


def _good_report(model: ModelInputs) -> p.DataReport:
    if model.task == "lm":
        return p.DataReport(format="text", task="lm", n_samples=7, sample_shape=[], char_counts={"a": 5, "b": 2})
    return p.DataReport(
        format="images",
        task="classification",
        n_samples=10,
        sample_shape=list(model.sample_shape),
        channel_stats=p.ChannelStats(count=7840, mean=[0.3], m2=[700.0]),
        class_counts={"1": 10},
    )


@fuzz("data.report.combine", 400)
@given(seed=SEEDS, model_name=st.sampled_from(sorted(MODELS)))
def test_a_devices_data_report_is_judged_with_a_reason(seed: int, model_name: str) -> None:
    # Prepare: a Registration whose data report lies or is type-confused; it goes through decode first
    rng = random.Random(seed)
    report = _raw(_report())
    if rng.random() < 0.5:
        report.update(task="lm", format="text", sample_shape=[], char_counts={"a": 5, "b": 2}, class_counts={})
    raw = confuse(rng, report) if rng.random() < 0.7 else report
    if rng.random() < 0.5 and isinstance(raw.get("class_counts"), dict):
        raw["class_counts"][rng.choice(CLASS_NAMES)] = 3
    if rng.random() < 0.5:
        floats = [0.5, -1.0, 0.0, 1e308, math.inf, -math.inf, math.nan]
        raw["channel_stats"] = {
            "count": rng.choice([0, 1, 784, 2**64 - 1]),
            "mean": [rng.choice(floats) for _ in range(rng.randint(0, 3))],
            "m2": [rng.choice(floats) for _ in range(rng.randint(0, 3))],
        }
    registration = _raw(MESSAGES["Registration"])
    registration["data"] = raw
    model = MODELS[model_name]
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
            prep = combine_reports([decoded.data, _good_report(model)], model)
        except DataError as exc:
            assert str(exc)
            record("data.report.combine", "-", "rejected")
            return
    # Assert: the preprocessing it agreed is valid on the wire (it goes out in every task), and finite
    msgspec.convert(_raw(prep), p.Preprocessing)
    assert all(math.isfinite(v) for v in (*prep.mean, *prep.std)), "one device's report poisons every device's inputs"
    record("data.report.combine", "-", "set-aside" if reason else "accepted")


# ---------------------------------------------------------------- the figures


def test_every_wire_target_ran_its_budget() -> None:
    """Runs last in this module: every fuzz target above ran the examples its profile asked for."""
    if not summary():
        pytest.skip("no fuzz target ran in this session")
    assert not shortfalls(""), shortfalls("")
