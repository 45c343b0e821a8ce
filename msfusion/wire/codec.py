"""Compressed weight transfers: fp16 and int8 (per-channel scale), with error feedback for int8 (numpy, torch-free).

A task names its codec (`TrainTask.codec`, from the run's `[engine] codec`; a
device that does not list it in `Capacity.codecs` gets "fp32"). The weights
go down as the codec's rounding of the global sub-model; the slice comes back
as the rounded *update* (trained - what the device received), which the
coordinator adds to the exact sub-model it cut: updates are small and centred,
so 8 bits lose far less of them than of the weights, and the rounding of the
download never enters the global model.

int8: per output channel (axis 0; a 1-D tensor has one scale), symmetric,
scale = max|x| / 127 sent as fp16, so a tensor of n elements in c channels
costs n + 2c bytes against 4n. Error feedback (Seide et al. 2014; Karimireddy et al. 2019):
the device keeps what rounding took from its update (`residual`) and adds it
to the next update of the same elements, so the rounding error does not
accumulate; a window shifts, so the residual is re-sliced like the
contrastive negative (units no longer held drop theirs, new units start at 0).

Payloads are safetensors files whose metadata names the codec and whether they
hold an update; fp16 and int8 put every tensor in one flat buffer and list
names and shapes in the metadata (a sub-model of many small tensors would
otherwise pay a header entry per tensor, a large share of an int8 payload).
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load, save

from msfusion.errors import InvalidSlice, ProtocolError
from msfusion.wire.protocol import CODECS, Codec
from msfusion.wire.weights import _canonical_header, pack_weights, unpack_weights

__all__ = ["CODECS", "Codec"]  # their home is the wire schema (`TrainTask.codec`); re-exported here
VALUES = "values"  # fp16 / int8: every tensor, flattened, in layout order
SCALES = "scales"  # int8: every tensor's per-channel fp16 scales, in layout order
MAX_TENSORS = 4096
Weights = dict[str, npt.NDArray[np.float32]]


def check_codec(codec: str) -> Codec:
    """`codec` if it is one of `CODECS`.

    Raises:
        ProtocolError: an unknown codec.
    """
    if codec not in CODECS:
        raise ProtocolError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    return codec  # type: ignore[return-value]


def _channels(shape: tuple[int, ...]) -> int:
    """Scales per tensor: one per index of axis 0 (one for a 1-D or 0-d tensor)."""
    return shape[0] if len(shape) >= 2 else 1


def _int8(values: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float16]]:
    """Per-channel symmetric int8: (q, scale) with values ~= q * scale (scale per index of axis 0, fp16)."""
    flat = values.reshape(_channels(values.shape), -1)
    peak = np.abs(flat).max(axis=1) if flat.size else np.zeros(flat.shape[0], np.float32)
    # The scale travels as fp16 (rounded up, so no value overflows 127); q is computed with the rounded one.
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float16)
    scale = np.where(scale.astype(np.float32) * 127.0 < peak, np.nextafter(scale, np.float16(np.inf)), scale)
    scale = np.maximum(scale, np.float16(2.0**-24))  # the smallest fp16 above 0: a tiny channel still decodes
    q = np.clip(np.rint(flat / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return q.reshape(values.shape), scale


def _dequantize(q: npt.NDArray[np.int8], scale: npt.NDArray[np.float16]) -> npt.NDArray[np.float32]:
    flat = q.reshape(_channels(q.shape), -1)
    return (flat.astype(np.float32) * scale.astype(np.float32)[:, None]).reshape(q.shape)


def roundtrip(weights: Mapping[str, npt.NDArray[np.float32]], codec: Codec) -> Weights:
    """What the receiver gets of `weights` sent with `codec` (float32)."""
    if codec == "fp32":
        return {n: np.asarray(a, np.float32) for n, a in weights.items()}
    if codec == "fp16":
        return {n: np.asarray(a, np.float32).astype(np.float16).astype(np.float32) for n, a in weights.items()}
    out: Weights = {}
    for name, values in weights.items():
        q, scale = _int8(np.asarray(values, np.float32))
        out[name] = _dequantize(q, scale)
    return out


def encode(weights: Mapping[str, npt.NDArray[np.float32]], codec: Codec, update: bool = False) -> bytes:
    """A safetensors payload of `weights` in `codec` (`update`: they are an update, not weights).

    fp32: one tensor each, as `weights.pack_weights`. fp16 and int8: every tensor in one flat
    buffer (`VALUES`; int8's fp16 scales in `SCALES`) and their names and shapes in the
    metadata, so a sub-model of many small tensors does not pay a header entry per tensor.
    """
    check_codec(codec)
    arrays = {name: np.ascontiguousarray(values, np.float32) for name, values in weights.items()}
    meta = {"codec": codec, "update": "1" if update else "0"}
    if codec == "fp32":
        data: bytes = save(arrays, metadata=meta)
        return data
    layout = [[name, list(arr.shape)] for name, arr in arrays.items()]
    meta["layout"] = json.dumps(layout, separators=(",", ":"))
    empty = np.zeros(0, np.float32)
    if codec == "fp16":
        flat = np.concatenate([a.reshape(-1) for a in arrays.values()] or [empty]).astype(np.float16)
        data = save({VALUES: flat}, metadata=meta)
        return data
    parts = [_int8(a) for a in arrays.values()]
    values = np.concatenate([q.reshape(-1) for q, _ in parts] or [empty.astype(np.int8)])
    scales = np.concatenate([s for _, s in parts] or [empty.astype(np.float16)])
    data = save({VALUES: values, SCALES: scales}, metadata=meta)
    return data


def decode(data: bytes) -> tuple[Weights, Codec, bool]:
    """(float32 weights, codec, whether they are an update) of an `encode` payload.

    Raises:
        ProtocolError: not a safetensors payload, an unknown codec, a layout that does not
            match the buffers (sizes, dtypes, scales), non-finite values.
    """
    try:
        raw = load(data)
        header = _metadata(data)  # `load` drops the metadata
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on garbage
        raise ProtocolError(f"not a weights payload: {exc}") from None
    codec = check_codec(header.get("codec", "fp32"))
    update = header.get("update", "0") == "1"
    out: Weights = {}
    if codec == "fp32":
        for name, arr in raw.items():
            if arr.dtype != np.float32:
                raise ProtocolError(f"{name}: dtype {arr.dtype} in a fp32 payload")
            out[name] = arr
    else:
        layout = _layout(header)
        values = raw.get(VALUES)
        expected = np.float16 if codec == "fp16" else np.int8
        if values is None or values.dtype != expected or values.ndim != 1:
            raise ProtocolError(f"a {codec} payload needs a flat {np.dtype(expected).name} {VALUES!r} tensor")
        sizes = [math.prod(shape) for _, shape in layout]
        if sum(sizes) != values.size:
            raise ProtocolError(f"layout names {sum(sizes)} values, the payload holds {values.size}")
        scales = raw.get(SCALES)
        if codec == "int8":
            channels = sum(_channels(shape) for _, shape in layout)
            if scales is None or scales.dtype != np.float16 or scales.shape != (channels,):
                raise ProtocolError(f"an int8 payload needs {channels} fp16 scales in {SCALES!r}")
            if not np.all(np.isfinite(scales)):
                raise ProtocolError("non-finite int8 scale")
        at = scale_at = 0
        for (name, shape), size in zip(layout, sizes):
            part = values[at : at + size].reshape(shape)
            at += size
            if codec == "fp16":
                out[name] = part.astype(np.float32)
            else:
                assert scales is not None
                n = _channels(shape)
                out[name] = _dequantize(part, scales[scale_at : scale_at + n])
                scale_at += n
    for name, arr in out.items():
        if not np.all(np.isfinite(arr)):
            raise ProtocolError(f"{name}: non-finite values")
    return out, codec, update


def _layout(header: Mapping[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) list of a flat payload's metadata."""
    try:
        raw = json.loads(header["layout"])
        layout = [(str(name), tuple(int(d) for d in shape)) for name, shape in raw]
    except (KeyError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed layout in a compressed payload: {exc}") from None
    if len({name for name, _ in layout}) != len(layout) or any(d < 0 for _, s in layout for d in s):
        raise ProtocolError("layout repeats a tensor or has a negative dimension")
    if len(layout) > MAX_TENSORS or any(len(s) > 8 for _, s in layout):
        raise ProtocolError(f"layout beyond {MAX_TENSORS} tensors or 8 dimensions")
    return layout


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors payload (its 8-byte length, then a JSON header)."""
    if len(data) < 8:
        raise ProtocolError("payload shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ProtocolError("safetensors header longer than the payload")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ProtocolError("safetensors metadata is not a table")
    return {str(k): str(v) for k, v in meta.items()}


def compress_update(
    update: Mapping[str, npt.NDArray[np.float32]], codec: Codec, residual: Mapping[str, npt.NDArray[np.float32]] | None
) -> tuple[Weights, Weights | None]:
    """The update as the receiver will get it, and the new residual (int8 only: error feedback).

    Args:
        update: trained - received, per tensor.
        codec: the transfer's codec.
        residual: what rounding took from this device's previous updates, re-sliced to these
            elements (None: none yet).
    """
    if codec != "int8":
        return roundtrip(update, codec), None
    corrected = {
        n: np.asarray(u, np.float32) + (residual[n] if residual and n in residual else 0.0) for n, u in update.items()
    }
    sent = roundtrip(corrected, codec)
    return sent, {n: corrected[n] - sent[n] for n in corrected}


def pack(weights: Mapping[str, npt.NDArray[np.float32]], codec: Codec) -> bytes:
    """A task's weights payload: fp32 as `weights.pack_weights` (checksummed, what any device reads), else `encode`.

    The same weights always pack to the same bytes (safetensors orders its metadata at random).
    """
    return pack_weights(weights) if codec == "fp32" else _canonical_header(encode(weights, codec))


def pack_update(
    update: Mapping[str, npt.NDArray[np.float32]], codec: Codec, residual: Mapping[str, npt.NDArray[np.float32]] | None
) -> tuple[bytes, Weights | None]:
    """A compressed slice's payload: `update` (plus the int8 residual) encoded, and the new residual.

    As `compress_update`, but the payload is encoded from the corrected update itself, so what
    the receiver decodes is exactly what the new residual was computed against.
    """
    if codec != "int8":
        return _canonical_header(encode(update, codec, update=True)), None
    corrected = {
        n: np.asarray(u, np.float32) + (residual[n] if residual and n in residual else 0.0) for n, u in update.items()
    }
    sent = roundtrip(corrected, codec)  # what `decode` gives of the payload, bit for bit
    return _canonical_header(encode(corrected, codec, update=True)), {n: corrected[n] - sent[n] for n in corrected}


def unpack(data: bytes, codec: Codec, update: bool) -> Weights:
    """The float32 tensors of a payload that must be in `codec` (fp32: `pack_weights` bytes) and an update or not.

    Raises:
        ArtifactError: a fp32 payload that is not `pack_weights` bytes or fails its checksum.
        ProtocolError: a compressed payload that is malformed, non-finite, in another codec, or not
            what `update` says.
    """
    if codec == "fp32":
        return unpack_weights(data)
    weights, got, is_update = decode(data)
    if got != codec or is_update != update:
        what = "an update" if is_update else "weights"
        raise ProtocolError(
            f"the payload is {what} in {got}; expected {'an update' if update else 'weights'} in {codec}"
        )
    return weights


def check_like(update: Mapping[str, npt.NDArray[np.float32]], sent: Mapping[str, npt.NDArray[np.float32]]) -> None:
    """An update's tensors must be tensors of `sent`, in their shapes (before they are added to it).

    Raises:
        InvalidSlice: naming the first tensor that is not.
    """
    for name, values in update.items():
        if name not in sent:
            raise InvalidSlice(f"the update names tensor {name!r}, which was not sent")
        if values.shape != sent[name].shape:
            raise InvalidSlice(f"the update of {name!r} has shape {values.shape}, {sent[name].shape} was sent")
