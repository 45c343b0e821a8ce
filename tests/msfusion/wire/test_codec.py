"""Compressed transfers: round trips within their stated error, refused malformed payloads, error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from msfusion.errors import ProtocolError
from msfusion.wire.codec import CODECS, SCALES, VALUES, compress_update, decode, encode, roundtrip
from msfusion.wire.weights import pack_weights


@pytest.fixture()
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
        "conv.bias": (0.1 * rng.standard_normal(16)).astype(np.float32),
        "zero.weight": np.zeros((4, 4), np.float32),
    }


@pytest.mark.parametrize("codec", CODECS)
def test_a_payload_decodes_to_what_roundtrip_says_the_receiver_gets(weights: dict[str, np.ndarray], codec) -> None:  # type: ignore[no-untyped-def]
    decoded, got_codec, update = decode(encode(weights, codec, update=True))
    expected = roundtrip(weights, codec)
    assert got_codec == codec and update
    for name in weights:
        np.testing.assert_array_equal(decoded[name], expected[name])
        assert decoded[name].dtype == np.float32 and decoded[name].shape == weights[name].shape


def test_round_trips_stay_within_their_stated_error(weights: dict[str, np.ndarray]) -> None:
    fp16 = roundtrip(weights, "fp16")
    int8 = roundtrip(weights, "int8")
    for name, w in weights.items():
        np.testing.assert_array_equal(roundtrip(weights, "fp32")[name], w)
        # fp16: half a unit in the last place of an 11-bit significand
        assert np.all(np.abs(fp16[name] - w) <= np.abs(w) * 2.0**-11 + 1e-7)
        # int8: half a step of each channel's scale, max|x| / 127 (rounded up to fp16: 2^-11 more)
        flat = w.reshape(w.shape[0], -1) if w.ndim >= 2 else w.reshape(1, -1)
        step = np.abs(flat).max(axis=1, keepdims=True) / 127.0 * (1 + 2.0**-10)
        err = np.abs(int8[name] - w).reshape(flat.shape)
        assert np.all(err <= step / 2 + 1e-7), name
    np.testing.assert_array_equal(int8["zero.weight"], 0.0)  # an all-zero channel stays exactly zero


def test_int8_costs_about_a_quarter_and_fp16_half_of_fp32() -> None:
    rng = np.random.default_rng(2)
    weights = {
        "conv.weight": rng.standard_normal((64, 32, 3, 3)).astype(np.float32),
        "conv.bias": np.ones(64, np.float32),
    }
    fp32 = len(pack_weights(weights))
    assert len(encode(weights, "fp16")) < 0.55 * fp32
    assert len(encode(weights, "int8")) < 0.30 * fp32


def _retyped(tensors, meta):  # type: ignore[no-untyped-def]
    return {**tensors, VALUES: tensors[VALUES].astype(np.float32)}, meta


@pytest.mark.parametrize(
    "tamper,message",
    [
        (_retyped, "flat int8"),
        (lambda t, m: ({VALUES: t[VALUES]}, m), "scales"),
        (lambda t, m: ({**t, SCALES: t[SCALES][:3]}, m), "scales"),
        (lambda t, m: ({**t, SCALES: np.full_like(t[SCALES], np.inf)}, m), "non-finite"),
        (lambda t, m: ({**t, VALUES: t[VALUES][:-1]}, m), "layout names"),
        (lambda t, m: (t, {**m, "layout": "[[1"}), "malformed layout"),
        (lambda t, m: (t, {**m, "layout": '[["a",[2]],["a",[2]]]'}), "repeats"),
    ],
    ids=["fp32-values", "scales-missing", "scales-short", "scales-infinite", "values-short", "bad-json", "repeat"],
)
def test_a_malformed_int8_payload_is_refused(weights: dict[str, np.ndarray], tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    import json

    from safetensors.numpy import load, save

    data = encode(weights, "int8")
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors, meta = tamper(load(data), meta)
    with pytest.raises(ProtocolError, match=message):
        decode(save(tensors, metadata=meta))


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"\xff" * 64, (10**9).to_bytes(8, "little") + b"{}"])
def test_garbage_is_refused_with_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


def test_an_unknown_codec_is_refused(weights: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    with pytest.raises(ProtocolError, match="unknown codec"):
        decode(save({"a": np.ones(2, np.float32)}, metadata={"codec": "int4"}))
    with pytest.raises(ProtocolError, match="unknown codec"):
        encode(weights, "int4")  # type: ignore[arg-type]


def test_error_feedback_keeps_the_sum_of_sent_updates_close_to_the_sum_of_true_ones() -> None:
    # Many small updates of one slice: without feedback int8 rounding drifts; with it, the sent total
    # differs from the true total by at most one last rounding (the residual carried).
    rng = np.random.default_rng(1)
    true_total = np.zeros((8, 32), np.float32)
    sent_total = np.zeros_like(true_total)
    plain_total = np.zeros_like(true_total)
    residual = None
    for _ in range(200):
        update = {"w": (1e-3 * rng.standard_normal((8, 32)) + 2e-4).astype(np.float32)}
        true_total += update["w"]
        sent, residual = compress_update(update, "int8", residual)
        sent_total += sent["w"]
        plain_total += roundtrip(update, "int8")["w"]
    assert residual is not None
    np.testing.assert_allclose(sent_total + residual["w"], true_total, atol=1e-5)
    feedback_error = float(np.abs(sent_total - true_total).max())
    plain_error = float(np.abs(plain_total - true_total).max())
    assert feedback_error < plain_error


def test_fp16_needs_no_residual(weights: dict[str, np.ndarray]) -> None:
    sent, residual = compress_update(weights, "fp16", None)
    assert residual is None
    np.testing.assert_array_equal(sent["conv.weight"], roundtrip(weights, "fp16")["conv.weight"])


def test_pack_and_unpack_are_fp32_pack_weights_or_the_codecs_payload(weights: dict[str, np.ndarray]) -> None:
    from msfusion.wire.codec import pack, unpack
    from msfusion.wire.weights import unpack_weights

    # fp32 is `pack_weights` (checksummed): what a device without codecs reads
    assert pack(weights, "fp32") == pack_weights(weights)
    assert set(unpack_weights(pack(weights, "fp32"))) == set(weights)
    for codec in ("fp16", "int8"):
        data = pack(weights, codec)
        assert data == pack(weights, codec)  # the same weights, the same bytes (metadata in a fixed order)
        got = unpack(data, codec, update=False)
        for name in weights:
            np.testing.assert_array_equal(got[name], roundtrip(weights, codec)[name])


@pytest.mark.parametrize(
    ("data_codec", "update", "want_codec", "want_update", "reason"),
    [
        ("int8", False, "int8", True, "weights in int8; expected an update in int8"),
        ("fp16", True, "int8", True, "an update in fp16; expected an update in int8"),
        ("int8", True, "int8", False, "an update in int8; expected weights in int8"),
    ],
)
def test_unpack_refuses_a_payload_of_another_codec_or_kind(  # type: ignore[no-untyped-def]
    weights: dict[str, np.ndarray], data_codec, update, want_codec, want_update, reason
) -> None:
    from msfusion.wire.codec import unpack

    with pytest.raises(ProtocolError, match=reason):
        unpack(encode(weights, data_codec, update=update), want_codec, update=want_update)


def test_pack_update_payload_and_residual_add_up_to_the_corrected_update(weights: dict[str, np.ndarray]) -> None:
    from msfusion.wire.codec import pack_update

    # Prepare
    rng = np.random.default_rng(1)
    update = {n: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in weights.items()}
    residual = {n: (1e-4 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in weights.items()}
    # Execute
    data, kept = pack_update(update, "int8", residual)
    sent, codec, is_update = decode(data)
    # Assert: what went up plus what the device keeps is the update plus the old residual, to float rounding
    assert codec == "int8" and is_update and kept is not None
    for name in update:
        np.testing.assert_allclose(sent[name] + kept[name], update[name] + residual[name], atol=1e-8)
    expected, _ = compress_update(update, "int8", residual)
    for name in update:
        np.testing.assert_array_equal(sent[name], expected[name])
    data16, none = pack_update(update, "fp16", residual)
    assert none is None and decode(data16)[1:] == ("fp16", True)
