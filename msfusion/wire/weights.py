"""Named float32 tensors as bytes: safetensors (numpy API, no torch) plus a checksum.

The names are the spec's tensor names (torch ``state_dict`` keys). The
safetensors header metadata carries a format tag and a sha256 over the tensors
(names, shapes, values in name order), so a payload that was damaged or built
by something else is rejected with `ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Mapping

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.numpy

from msfusion.algorithm.slicing import Weights
from msfusion.errors import ArtifactError, InvalidSlice

FORMAT = "msfusion-weights-1"
_MAX_HEADER_BYTES = 100 << 20


def _digest(weights: Mapping[str, npt.NDArray[np.float32]]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        array = weights[name]
        h.update(f"{name}\0{list(array.shape)}\0".encode())
        h.update(np.asarray(array, dtype="<f4", order="C").reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def pack_weights(weights: Mapping[str, npt.ArrayLike]) -> bytes:
    """Serialize named tensors as float32 safetensors bytes with a checksum.

    Args:
        weights: tensor name -> array of any floating dtype (cast to float32).

    Returns:
        The safetensors bytes.

    Raises:
        ArtifactError: an empty name or a non-floating array.
    """
    arrays: Weights = {}
    for name, value in weights.items():
        array = np.asarray(value)
        if not name or not isinstance(name, str):
            raise ArtifactError(f"tensor name {name!r} is not a non-empty string")
        if not np.issubdtype(array.dtype, np.floating):
            raise ArtifactError(f"tensor {name!r} has dtype {array.dtype}, expected floating point")
        # safetensors reads raw memory: the array must be contiguous.
        arrays[name] = np.asarray(array, dtype=np.float32, order="C")
    metadata = {"format": FORMAT, "sha256": _digest(arrays)}
    return _canonical_header(safetensors.numpy.save(arrays, metadata=metadata))


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys sorted.

    safetensors writes the metadata map in a per-process random order, so the
    same tensors would pack to different bytes (and sha256) in two processes;
    a resumed coordinator must send the very bytes it sent before its crash.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text + data[8 + header_len :]


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ArtifactError(f"weights payload of {len(data)} bytes is too short")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise ArtifactError(f"weights header length {header_len} exceeds the payload")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise ArtifactError(f"weights header is not JSON: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ArtifactError("weights header has no metadata (not packed by pack_weights)")
    # Before safetensors reads any tensor: it has no numpy dtype for some of its own (BF16: a KeyError).
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        if name != "__metadata__" and dtype != "F32":
            raise ArtifactError(f"tensor {name!r} has dtype {dtype!r}, expected float32 ('F32')")
    return metadata


def unpack_weights(data: bytes, *, require_finite: bool = False) -> Weights:
    """Deserialize `pack_weights` bytes, verifying format and checksum.

    Args:
        data: the bytes.
        require_finite: also reject NaN/inf values (see `check_finite`).

    Returns:
        tensor name -> float32 array.

    Raises:
        ArtifactError: not our format, unreadable, not float32, or a checksum mismatch.
        InvalidSlice: `require_finite` and a tensor holds NaN or inf.
    """
    metadata = _read_metadata(data)
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"weights format {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        weights: Weights = safetensors.numpy.load(data)
    except safetensors.SafetensorError as exc:
        raise ArtifactError(f"unreadable weights: {exc}") from exc
    for name, array in weights.items():
        if array.dtype != np.float32:
            raise ArtifactError(f"tensor {name!r} has dtype {array.dtype}, expected float32")
    if _digest(weights) != metadata.get("sha256"):
        raise ArtifactError("weights fail their sha256 (corrupt payload)")
    if require_finite:
        check_finite(weights)
    return weights


def check_finite(weights: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Reject weights holding NaN or inf.

    Raises:
        InvalidSlice: naming the first tensor (by name order) with a non-finite value.
    """
    for name in sorted(weights):
        array = weights[name]
        if not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise InvalidSlice(f"tensor {name!r} holds {bad} non-finite values of {array.size}")


def nbytes(weights: Mapping[str, npt.NDArray[np.floating]]) -> int:
    """Total float32 bytes of the tensors (what a slice costs on the wire, header aside)."""
    return sum(4 * math.prod(array.shape) for array in weights.values())
