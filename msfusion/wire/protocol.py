"""The fleet's wire schema: typed, versioned messages and one encode/decode pair.

Both sides (coordinator and device) import this module; it needs msgspec only.

Messages are frozen `msgspec.Struct`s encoded as MessagePack maps. Every message
carries a ``type`` tag (which struct it is) and ``schema_version``.

Versioning: ``SCHEMA_VERSION`` is a major version. `decode` rejects any message
whose ``schema_version`` differs from ours with a `ProtocolError`, before it
looks at the other fields, so an incompatible peer gets a clear reason rather
than a field error. Compatible changes keep the version: a new field must have
a default, and decoders ignore fields they do not know, so an older peer still
reads a newer peer's messages. Renaming, retyping or removing a field, or
tightening a constraint, bumps ``SCHEMA_VERSION``.

Validation happens on decode (types, ranges, id patterns, cross-field rules in
``__post_init__``); `encode` validates too, so a bad message fails at its
sender. Constructing a struct directly checks only the cross-field rules
(``ValueError``), not types or ranges.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from msfusion.errors import (
    ArtifactError,
    DataError,
    MemoryBudgetExceeded,
    ProtocolError,
)

SCHEMA_VERSION = 1
MAX_CHUNK_BYTES = 1 << 20  # 1 MiB: larger MQTT publishes were slower and less reliable
# The largest sizes a peer may declare, checked on decode before anything is allocated for them. A receiver
# bounds them further by what it expects: the coordinator a slice by its planned sub-model's size, a device
# a task's transfers by its memory budget.
MAX_TRANSFER_BYTES = 16 << 30  # one artifact, weights or slice transfer (a 1.2 GB char-LM bundle fits 13 times)
MAX_CHUNKS = 1 << 16  # chunks in one transfer: the largest transfer in chunks of 256 KiB at least
MAX_LOCAL_EPOCHS = 100
MAX_BATCH_SIZE = 1 << 16
MAX_SAMPLES = 1 << 31  # samples per epoch a task may ask for or a result may claim
MAX_DEADLINE_S = 7 * 24 * 3600.0  # a week: a task's deadline from receipt
MAX_STEPS = 1 << 20  # loss values a result may carry (one per local step): 9 MiB, under the broker's packet cap
MAX_GROUPS = 4096  # width groups of a task's sub-model (and tensors with split axes)
MAX_UNITS = 1 << 24  # hidden units of one width group (and the largest unit index or unit size)
MAX_CHANNELS = 64  # input channels a data report or preprocessing describes
MAX_CLASSES = 1 << 16  # class names (and vocabulary characters) of a data report or preprocessing

# Ids go into topic names, so no '/', '+', '#', '$' or whitespace. `\Z`, not `$`:
# `$` also matches before a trailing newline.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"

Id = Annotated[str, Meta(pattern=ID_PATTERN)]
OptionalId = Annotated[str, Meta(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?\Z")]  # an id, or "" for none
Name = Annotated[str, Meta(min_length=1, max_length=256)]  # tensor and group names
Sha256Hex = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
Count = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(ge=0.0)]
Ratio = Annotated[float, Meta(gt=0.0, le=1.0)]

DeviceState = Literal["idle", "training", "uploading", "offline"]
# Transfer codecs (`wire/codec.py`). A device lists what it decodes as plain names, so a newer device's
# codec does not make an older coordinator refuse its registration; a task names one the device listed.
Codec = Literal["fp32", "fp16", "int8"]
CODECS: tuple[Codec, ...] = ("fp32", "fp16", "int8")
CodecName = Annotated[str, Meta(min_length=1, max_length=16)]
BulkKind = Literal["artifact", "weights", "slice"]
FailureCode = Literal["memory_budget", "artifact", "data", "protocol", "deadline", "internal", "bad_signature"]


class _Struct(msgspec.Struct, frozen=True, kw_only=True):
    """Nested value (not a message on its own)."""


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Top-level message: tagged by ``type``, versioned by ``schema_version``."""

    schema_version: int = SCHEMA_VERSION


class BulkRef(_Struct, frozen=True):
    """Manifest of a bulk transfer sent as `Chunk`s (artifact, weights, slice)."""

    transfer_id: Id
    kind: BulkKind
    # The sizes are bounded on decode only (a struct built here is trusted); n_chunks comes first on the
    # wire, so a manifest that claims a huge chunk count is refused before anything is sized by it.
    n_chunks: Annotated[int, Meta(ge=1, le=MAX_CHUNKS)]
    total_bytes: Annotated[int, Meta(ge=0, le=MAX_TRANSFER_BYTES)]
    sha256: Sha256Hex
    chunk_bytes: Annotated[int, Meta(ge=1, le=MAX_CHUNK_BYTES)]

    def __post_init__(self) -> None:
        expected = max(1, -(-self.total_bytes // self.chunk_bytes))
        if self.n_chunks != expected:
            raise ValueError(
                f"n_chunks {self.n_chunks} does not fit {self.total_bytes} bytes "
                f"in chunks of {self.chunk_bytes} (expected {expected})"
            )


class Capacity(_Struct, frozen=True):
    """What a device can afford: the planner sizes its sub-model from this."""

    memory_budget_bytes: Positive
    cores: Positive
    arch: Annotated[str, Meta(min_length=1, max_length=32)]  # "x86_64", "aarch64"
    backends: Annotated[list[Id], Meta(min_length=1, max_length=8)]  # artifact kinds it can train
    max_width_ratio: Ratio | None = None
    board: Annotated[str, Meta(max_length=64)] = ""  # its board profile ("" when not flashed with one)
    # The transfer codecs it decodes (an older device: fp32 only); a task in any other gets fp32.
    codecs: Annotated[list[CodecName], Meta(max_length=16)] = msgspec.field(default_factory=lambda: ["fp32"])
    pinned_backend: Annotated[str, Meta(max_length=32)] = ""  # device.toml's `backend` ("": the coordinator picks)
    device: Literal["cpu", "cuda"] = "cpu"  # where its torch backend trains (device.toml's `device`)


class ProfileEntry(_Struct, frozen=True):
    """One measured training configuration on a device."""

    width_ratio: Ratio
    batch_size: Positive
    peak_rss_bytes: Count  # the process's peak: sampled RSS and the kernel's VmHWM
    step_time_s: Seconds
    peak_uss_bytes: Count = 0  # memory this process alone held (0: not measured)
    backend: Annotated[str, Meta(max_length=32)] = ""  # the artifact kind measured ("": an older device's only one)
    peak_accelerator_bytes: Count = 0  # the GPU's peak (torch's counter) when it trained there (0: the CPU)


class AxisUnits(_Struct, frozen=True):
    """One split axis of a tensor: which width group indexes it, in blocks of `unit_size`."""

    axis: Annotated[int, Meta(ge=0, le=7)]
    group: Name
    unit_size: Annotated[int, Meta(ge=1, le=MAX_UNITS)]


class ChannelStats(_Struct, frozen=True):
    """Per-channel pixel statistics of one device's images: pooled exactly by `data.sources.merge_stats`."""

    count: Count  # pixels per channel
    mean: Annotated[list[float], Meta(max_length=MAX_CHANNELS)]
    m2: Annotated[list[float], Meta(max_length=MAX_CHANNELS)]  # sum of squared deviations from the mean

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.m2):
            raise ValueError(f"{len(self.mean)} means but {len(self.m2)} m2 values")


class DataReport(_Struct, frozen=True):
    """What a device's data is, sent with its registration (`msfusion/data/sources.py`): no sample leaves the board."""

    format: Annotated[str, Meta(min_length=1, max_length=16)]
    task: Literal["classification", "lm"]
    n_samples: Count  # images, or characters of text
    # (C, H, W) of images; (T,) of encoded windows; [] for text
    sample_shape: Annotated[list[Count], Meta(max_length=8)]
    channel_stats: ChannelStats | None = None
    class_counts: Annotated[dict[Name, Count], Meta(max_length=MAX_CLASSES)] = {}
    char_counts: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=1)], Count], Meta(max_length=65536)] = {}
    encoded: bool = False  # LM windows already in ids: no vocabulary needed
    problems: Annotated[list[Annotated[str, Meta(max_length=1024)]], Meta(max_length=64)] = []
    fatal: Annotated[str, Meta(max_length=1024)] = ""  # why this device cannot train ("" = it can)


class Preprocessing(_Struct, frozen=True):
    """How every device turns its raw data into the model's inputs: agreed by the coordinator, sent in tasks."""

    mean: Annotated[list[float], Meta(max_length=MAX_CHANNELS)] = []  # per channel, of pixels in [0, 1]
    std: Annotated[list[Annotated[float, Meta(gt=0.0)]], Meta(max_length=MAX_CHANNELS)] = []
    # label names in label order ([]: integer labels as stored)
    classes: Annotated[list[Name], Meta(max_length=MAX_CLASSES)] = []
    # character ids by position; out-of-vocabulary characters get id len(vocab)
    vocab: Annotated[str, Meta(max_length=MAX_CLASSES)] = ""
    context: Count = 0  # window length of text

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"{len(self.mean)} means but {len(self.std)} stds")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names must be unique")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocabulary characters must be unique")


class ProfileReport(_Message, frozen=True, tag="profile"):
    """A device's measured training configurations (`msfusion-device profile`), sent with its registration."""

    run_id: Id
    device_id: Id
    entries: Annotated[list[ProfileEntry], Meta(max_length=1024)]
    # Names the model, loss and optimizer the profiled artifacts implement, whatever their kind
    # (coordinator.artifacts.profile_key): a coordinator ignores a profile of another model.
    model_key: Annotated[str, Meta(max_length=64)] = ""


class Registration(_Message, frozen=True, tag="register"):
    run_id: Id
    device_id: Id
    capacity: Capacity
    runtime_version: Annotated[str, Meta(min_length=1, max_length=64)]
    profile: ProfileReport | None = None
    data: DataReport | None = None  # None: an older device; it trains its shard as stored


class Welcome(_Message, frozen=True, tag="welcome"):
    """Coordinator's answer to a `Registration`."""

    run_id: Id
    device_id: Id
    accepted: bool
    reason: Annotated[str, Meta(max_length=4096)] = ""
    session: Annotated[str, Meta(max_length=64)] = ""  # the coordinator session that admitted it (signed)
    signature: bytes = b""  # the coordinator's (`wire/signing.py`); devices with its key refuse unsigned ones


class RunControl(_Message, frozen=True, tag="control"):
    run_id: Id
    device_id: Id
    command: Literal["stop"]
    reason: Annotated[str, Meta(max_length=4096)] = ""
    session: Annotated[str, Meta(max_length=64)] = ""  # the coordinator session it ends (signed)
    signature: bytes = b""  # the coordinator's (`wire/signing.py`)


class Heartbeat(_Message, frozen=True, tag="heartbeat"):
    """Device state, published retained on its status topic (also its last will)."""

    run_id: Id
    device_id: Id
    state: DeviceState
    sent_at: Seconds  # sender's wall clock (time.time())
    task_id: Id | None = None
    progress: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0


class TrainTask(_Message, frozen=True, tag="task"):
    """One device's work for one round: which sub-model, how to train it."""

    run_id: Id
    round_idx: Count
    device_id: Id
    task_id: Id
    backend: Id  # artifact kind, one of the device's Capacity.backends
    artifact: BulkRef
    weights: BulkRef  # the global sub-model to start from
    # width group -> global unit indices, sub-model order
    units: Annotated[
        dict[Name, Annotated[list[Annotated[int, Meta(ge=0, lt=MAX_UNITS)]], Meta(max_length=MAX_UNITS)]],
        Meta(max_length=MAX_GROUPS),
    ]
    # tensor -> its split axes
    tensor_axes: Annotated[dict[Name, Annotated[list[AxisUnits], Meta(max_length=8)]], Meta(max_length=MAX_GROUPS)]
    local_epochs: Annotated[int, Meta(ge=1, le=MAX_LOCAL_EPOCHS)]
    batch_size: Annotated[int, Meta(ge=1, le=MAX_BATCH_SIZE)]
    lr: Annotated[float, Meta(ge=0.0)]
    max_samples: Annotated[int, Meta(ge=0, le=MAX_SAMPLES)]  # 0 = all of the device's shard
    mu: Annotated[float, Meta(ge=0.0)]
    tau: Annotated[float, Meta(gt=0.0)]
    contrastive: Annotated[str, Meta(min_length=1, max_length=32)]
    optimizer: Annotated[str, Meta(min_length=1, max_length=32)]
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    deadline_s: Annotated[float, Meta(gt=0.0, le=MAX_DEADLINE_S)]  # from receipt: clocks are not shared
    signature: bytes = b""  # the coordinator's Ed25519 signature (`wire/signing.py`)
    preprocessing: Preprocessing | None = None  # None: the data is used as stored
    # The task whose trained slice is this one's contrastive negative: this device's slice that was merged
    # in the last merged round ("": none, train against the global sub-model). Never a slice of a discarded
    # attempt, nor of another coordinator session.
    negative_task_id: OptionalId = ""
    # How `weights` is encoded and how the slice must come back (`wire/codec.py`): fp32, the weights both
    # ways (`weights.pack_weights`); fp16 / int8, the rounded weights down and the rounded update up.
    codec: Codec = "fp32"

    def __post_init__(self) -> None:
        if self.codec not in CODECS:  # decode checks the literal too; this catches a struct built here
            raise ValueError(f"unknown codec {self.codec!r}; expected one of {', '.join(CODECS)}")
        for tensor, axes in self.tensor_axes.items():
            for axis in axes:
                if axis.group not in self.units:
                    raise ValueError(f"tensor {tensor!r} uses unknown group {axis.group!r}")

    @property
    def key(self) -> tuple[str, int, str, str]:
        """Idempotency key: a redelivered task with this key is handled once."""
        return (self.run_id, self.round_idx, self.device_id, self.task_id)


class SliceResult(_Message, frozen=True, tag="result"):
    """A trained slice is ready: its weights follow as a bulk transfer."""

    run_id: Id
    round_idx: Count
    device_id: Id
    task_id: Id
    weights: BulkRef
    n_samples: Annotated[int, Meta(ge=0, le=MAX_SAMPLES)]  # the coordinator bounds it by the task further
    loss_curve: Annotated[list[float], Meta(max_length=MAX_STEPS)]  # may hold NaN: the coordinator judges the slice
    step_time_s: Seconds
    peak_rss_bytes: Count
    wall_s: Seconds
    mac: Annotated[bytes, Meta(max_length=64)] = b""  # the device's HMAC over the rest (`wire/signing.py`)

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.run_id, self.round_idx, self.device_id, self.task_id)


class TaskFailed(_Message, frozen=True, tag="failed"):
    """The reply to a task that produced no slice (never sent with a result)."""

    run_id: Id
    round_idx: Count
    device_id: Id
    task_id: Id
    code: FailureCode
    reason: Annotated[str, Meta(max_length=4096)]
    details: Annotated[dict[Name, Union[int, float, Annotated[str, Meta(max_length=1024)]]], Meta(max_length=64)] = {}
    mac: Annotated[bytes, Meta(max_length=64)] = b""  # the device's HMAC over the rest (`wire/signing.py`)

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.run_id, self.round_idx, self.device_id, self.task_id)


class Chunk(_Message, frozen=True, tag="chunk"):
    """One piece of a bulk transfer; its own sha256 lets a receiver drop a bad piece."""

    transfer_id: Id
    index: Count
    n_chunks: Positive
    sha256: Sha256Hex
    data: Annotated[bytes, Meta(max_length=MAX_CHUNK_BYTES)]

    def __post_init__(self) -> None:
        if self.index >= self.n_chunks:
            raise ValueError(f"chunk index {self.index} >= n_chunks {self.n_chunks}")


class ChunkRequest(_Message, frozen=True, tag="chunk_request"):
    """A receiver asks for chunks it is missing; `device_id` names the subtree it concerns."""

    run_id: Id
    device_id: Id
    transfer_id: Id
    missing: Annotated[list[Annotated[int, Meta(ge=0, lt=MAX_CHUNKS)]], Meta(min_length=1, max_length=MAX_CHUNKS)]


Message = Union[
    Registration,
    ProfileReport,
    Welcome,
    RunControl,
    Heartbeat,
    TrainTask,
    SliceResult,
    TaskFailed,
    Chunk,
    ChunkRequest,
]
MESSAGE_TYPES: tuple[type[_Message], ...] = Message.__args__  # type: ignore[attr-defined]
_TAGS = frozenset(t.__struct_config__.tag for t in MESSAGE_TYPES)


class _Envelope(msgspec.Struct):
    """What every version of the schema agrees on: read first, to check the version."""

    type: str
    schema_version: int


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(msg: Message, *, validate: bool = True) -> bytes:
    """Encode a message as MessagePack.

    Args:
        msg: any message type of this module.
        validate: decode the bytes again so a malformed message fails here, at its sender.

    Returns:
        The bytes to publish.

    Raises:
        ProtocolError: `msg` is not a message or does not validate.
    """
    if not isinstance(msg, MESSAGE_TYPES):
        raise ProtocolError(f"not a protocol message: {type(msg).__name__}")
    try:
        data = _encoder.encode(msg)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from exc
    if validate:
        decode(data)
    return data


def decode(data: bytes) -> Message:
    """Decode and validate one message.

    Args:
        data: bytes as produced by `encode`.

    Returns:
        The message, every field validated.

    Raises:
        ProtocolError: malformed bytes, a different schema version, an unknown
            message type, or a field that fails validation (the reason says which).
    """
    # RecursionError: msgspec refuses nesting deeper than Python's recursion limit (a hostile peer's
    # thousands of nested arrays), after unwinding cleanly.
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc
    if envelope.schema_version != SCHEMA_VERSION:
        raise ProtocolError(
            f"schema version {envelope.schema_version} of a {envelope.type!r} message "
            f"is not supported (this side speaks {SCHEMA_VERSION})"
        )
    if envelope.type not in _TAGS:
        raise ProtocolError(f"unknown message type {envelope.type!r}")
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"invalid {envelope.type!r} message: {exc}") from exc


def failure_code(exc: BaseException) -> FailureCode:
    """Map an exception to the `TaskFailed.code` a device reports for it."""
    if isinstance(exc, MemoryBudgetExceeded):
        return "memory_budget"
    if isinstance(exc, ArtifactError):
        return "artifact"
    if isinstance(exc, DataError):
        return "data"
    if isinstance(exc, ProtocolError):
        return "protocol"
    return "internal"
