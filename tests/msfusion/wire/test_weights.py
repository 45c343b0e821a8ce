"""Weight payloads: float32 safetensors with a checksum, corruption rejected."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from msfusion.errors import ArtifactError, InvalidSlice
from msfusion.wire.weights import (
    FORMAT,
    check_finite,
    nbytes,
    pack_weights,
    unpack_weights,
)


def sample_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "stage1.conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "stage1.norm.bias": rng.standard_normal(8).astype(np.float32),
        "head.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "scale": np.array(2.5, dtype=np.float32),
    }


def test_round_trip_is_exact() -> None:
    weights = sample_weights()
    back = unpack_weights(pack_weights(weights))
    assert back.keys() == weights.keys()
    for name, array in weights.items():
        assert back[name].dtype == np.float32 and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)


def test_other_float_dtypes_and_layouts_become_contiguous_float32() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    back = unpack_weights(pack_weights({"t": base.T, "h": base[:, ::2].astype(np.float16)}))
    np.testing.assert_array_equal(back["t"], base.T.astype(np.float32))
    np.testing.assert_array_equal(back["h"], base[:, ::2].astype(np.float32))


def test_non_float_tensors_are_refused() -> None:
    with pytest.raises(ArtifactError, match="expected floating point"):
        pack_weights({"idx": np.arange(3)})


def test_flipped_value_fails_the_checksum() -> None:
    # Prepare: flip one bit in the last tensor value (the data section ends the payload)
    data = bytearray(pack_weights(sample_weights()))
    data[-1] ^= 0x01
    # Execute / Assert
    with pytest.raises(ArtifactError, match="sha256"):
        unpack_weights(bytes(data))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02", struct.pack("<Q", 10**9) + b"{}", struct.pack("<Q", 4) + b"nope"],
    ids=["empty", "short", "huge-header", "not-json"],
)
def test_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(ArtifactError):
        unpack_weights(data)


def test_foreign_safetensors_are_rejected() -> None:
    plain = safetensors.numpy.save({"w": np.ones(3, np.float32)})
    with pytest.raises(ArtifactError, match="no metadata"):
        unpack_weights(plain)
    tagged = safetensors.numpy.save({"w": np.ones(3, np.float32)}, metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="format 'pt'"):
        unpack_weights(tagged)


def test_truncated_payload_is_unreadable() -> None:
    data = pack_weights(sample_weights())
    with pytest.raises(ArtifactError, match="unreadable"):
        unpack_weights(data[:-4])


def test_float64_payload_with_our_tag_is_rejected() -> None:
    weights = {"w": np.ones(3, np.float64)}
    header = {"format": FORMAT, "sha256": "0" * 64}
    data = safetensors.numpy.save(weights, metadata=header)
    assert json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["w"]["dtype"] == "F64"
    with pytest.raises(ArtifactError, match="expected float32"):
        unpack_weights(data)


def test_check_finite_names_the_tensor() -> None:
    weights = sample_weights()
    check_finite(weights)
    weights["head.weight"][3, 4] = np.nan
    weights["head.weight"][0, 0] = np.inf
    with pytest.raises(InvalidSlice, match=r"'head.weight' holds 2 non-finite values of 80"):
        check_finite(weights)
    data = pack_weights(weights)
    assert np.isnan(unpack_weights(data)["head.weight"][3, 4])  # finiteness is opt-in
    with pytest.raises(InvalidSlice):
        unpack_weights(data, require_finite=True)


def test_nbytes_counts_float32() -> None:
    assert nbytes(sample_weights()) == 4 * (8 * 27 + 8 + 80 + 1)


def test_packing_is_byte_identical_across_processes() -> None:
    # safetensors orders its header map at random per process; a resumed coordinator must resend the same bytes.
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from msfusion.wire.weights import pack_weights\n"
        "w = {f't{i}': np.arange(i + 1, dtype=np.float32) for i in range(12)}\n"
        "print(hashlib.sha256(pack_weights(w)).hexdigest())\n"
    )
    digests = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(4)
    }
    assert len(digests) == 1
