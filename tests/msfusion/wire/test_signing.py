"""Signed coordinator messages: every flipped byte of a signed task is refused; keys load from PEM files."""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec
import pytest

from msfusion.errors import ConfigError, ProtocolError
from msfusion.wire.protocol import AxisUnits, BulkRef, RunControl, TrainTask, Welcome, decode, encode
from msfusion.wire.signing import MessageSigner, MessageVerifier, generate_signing_key


def _ref(kind: str, sha: str) -> BulkRef:
    return BulkRef(transfer_id=f"{kind}-1", kind=kind, total_bytes=3000, sha256=sha, n_chunks=3, chunk_bytes=1000)  # type: ignore[arg-type]


TASK = TrainTask(
    run_id="fmnist",
    round_idx=4,
    device_id="dev003",
    task_id="a1b2c3d4-r4-a0",
    backend="ort",
    artifact=_ref("artifact", "a" * 64),
    weights=_ref("weights", "b" * 64),
    units={"conv0": [0, 1, 2], "conv1": [5, 6]},
    tensor_axes={"conv0.weight": [AxisUnits(axis=0, group="conv0", unit_size=1)]},
    local_epochs=1,
    batch_size=32,
    lr=0.05,
    max_samples=256,
    mu=0.1,
    tau=0.5,
    contrastive="moon",
    optimizer="sgd",
    seed=12345,
    deadline_s=120.0,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[MessageSigner, MessageVerifier, Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    signer = generate_signing_key(folder / "task-signing.key", folder / "task-signing.pub")
    return (
        signer,
        MessageVerifier.from_pem(str(folder / "task-signing.pub")),
        folder / "task-signing.key",
        folder / "task-signing.pub",
    )


def test_a_signed_message_verifies_and_the_private_key_is_private(keys) -> None:  # type: ignore[no-untyped-def]
    signer, verifier, private, public = keys
    for msg in (
        TASK,
        Welcome(run_id="r", device_id="d", accepted=True),
        RunControl(run_id="r", device_id="d", command="stop"),
    ):
        signed = signer.sign(msg)
        verifier.verify(decode(encode(signed)))  # survives the wire
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert MessageSigner.from_file(private).public_pem() == public.read_text()
    assert MessageVerifier.from_pem(public.read_text())  # PEM text works as well as a path


def test_every_flipped_byte_of_a_signed_task_is_refused(keys) -> None:  # type: ignore[no-untyped-def]
    signer, verifier, _, _ = keys
    wire = bytearray(encode(signer.sign(TASK)))
    refused = same = 0
    for i in range(len(wire)):
        flipped = bytearray(wire)
        flipped[i] ^= 0x01
        try:
            msg = decode(bytes(flipped))
            assert isinstance(msg, TrainTask)
            verifier.verify(msg)
        except ProtocolError:
            refused += 1
            continue
        # Only a flip that leaves the message itself unchanged may pass (e.g. the name of an absent optional
        # field, ignored on decode, so the same task arrives).
        assert msgspec.structs.replace(msg, signature=b"") == TASK, f"byte {i} changed the task and still verified"
        same += 1
    print(f"{len(wire)} single-bit flips: {refused} refused, {same} decoded to the same task")
    # At most the bytes naming fields that hold their default (a renamed key falls back to that default).
    defaults = [f.name for f in msgspec.structs.fields(TrainTask) if getattr(TASK, f.name) == f.default]
    assert same <= sum(len(name) + 1 for name in defaults), defaults


@pytest.mark.parametrize(
    "change",
    [
        {"device_id": "dev004"},
        {"round_idx": 3},
        {"task_id": "a1b2c3d4-r4-a1"},
        {"local_epochs": 100},
        {"artifact": _ref("artifact", "c" * 64)},
        {"weights": _ref("weights", "d" * 64)},
    ],
)
def test_a_task_changed_after_signing_is_refused(keys, change: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    signer, verifier, _, _ = keys
    forged = msgspec.structs.replace(signer.sign(TASK), **change)
    with pytest.raises(ProtocolError, match="does not verify"):
        verifier.verify(forged)


def test_unsigned_or_foreign_messages_are_refused(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, verifier, _, _ = keys
    with pytest.raises(ProtocolError, match="unsigned"):
        verifier.verify(RunControl(run_id="r", device_id="d", command="stop"))
    other = generate_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(ProtocolError, match="does not verify"):
        verifier.verify(other.sign(TASK))
    with pytest.raises(ProtocolError, match="64"):
        verifier.verify(msgspec.structs.replace(TASK, signature=b"short"))


def test_a_bad_key_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="cannot read"):
        MessageSigner.from_file(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        MessageVerifier.from_pem(str(tmp_path / "missing.pub"))


def test_a_task_built_with_an_int_in_a_float_field_verifies_after_the_wire(keys) -> None:  # type: ignore[no-untyped-def]
    # Prepare: `RoundConfig(deadline_s=600)` puts the int 600 in a float field; the device decodes 600.0.
    signer, verifier, _, _ = keys
    loose = msgspec.structs.replace(TASK, deadline_s=600, lr=1)  # type: ignore[arg-type]
    # Execute
    arrived = decode(encode(signer.sign(loose)))
    # Assert: the signature covers what the device sees
    assert isinstance(arrived, TrainTask) and arrived.deadline_s == 600.0 and isinstance(arrived.deadline_s, float)
    verifier.verify(arrived)


def test_a_task_outside_its_schema_is_not_signed(keys) -> None:  # type: ignore[no-untyped-def]
    signer, _, _, _ = keys
    with pytest.raises(ProtocolError, match="outside its schema"):
        signer.sign(msgspec.structs.replace(TASK, local_epochs=1000))
