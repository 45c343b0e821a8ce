"""Signed coordinator messages: Ed25519 over a canonical encoding (torch-free; `cryptography`).

What a device obeys comes only from the coordinator: its tasks (`TrainTask`),
its admission (`Welcome`) and its stop (`RunControl`). The coordinator signs
each of them; a device configured with the coordinator's public key
(`device.toml`'s `task_signing_public_key`) verifies before it fetches or runs
anything.

Signed bytes: a domain tag naming the message type and version, then the
message's MessagePack encoding with ``signature`` empty and map keys sorted
(msgspec's deterministic order), so both sides build the same bytes from the
same fields. A task's signed fields include its run id, round, task id (which
names the attempt and the coordinator's session), device id, the sha256 of
its artifact and of its weights (inside its `BulkRef`s) and every training
knob: flipping any byte of any of them, or of the artifact or weights (their
sha256 is signed and checked on arrival), makes the task fail verification.

Keys are PEM files: the private key (PKCS#8, 0600) stays with the
coordinator, the public key (SubjectPublicKeyInfo) goes into every device's
bundle.

Authenticated results go the other way: each enrolled device holds its own
32-byte result key (`msfusion security enroll` writes it, `devices flash` puts
it in the bundle, the coordinator reads every device's from the security
folder) and puts an HMAC-SHA256 over the canonical encoding of each
`SliceResult` and `TaskFailed` in its ``mac`` field. The signed bytes hold
the run, round, task id, device id and the slice's sha256 (in its `BulkRef`),
so a result is accepted only from the device the task was issued to, for
that task: a symmetric MAC suffices because only the coordinator checks it,
and it costs a board microseconds where a signature would cost milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import TypeVar, Union

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from msfusion.errors import ConfigError, ProtocolError
from msfusion.wire.protocol import RunControl, SliceResult, TaskFailed, TrainTask, Welcome

Signed = Union[TrainTask, Welcome, RunControl]
S = TypeVar("S", TrainTask, Welcome, RunControl)
Reply = Union[SliceResult, TaskFailed]
R = TypeVar("R", SliceResult, TaskFailed)
DOMAIN = b"msfusion-signed-v1\x00"
RESULT_DOMAIN = b"msfusion-result-v1\x00"
SIGNATURE_BYTES = 64
RESULT_KEY_BYTES = 32
MAC_BYTES = 32

_canonical = msgspec.msgpack.Encoder(order="deterministic")


def _canonical_bytes(msg: Signed | Reply) -> bytes:
    """The message as the receiver will see it, encoded deterministically.

    The struct is first passed through its own schema, as a receiver decodes it: a value the
    sender built loosely (an int 600 in a float field such as ``deadline_s``) arrives as the float
    600.0, so encoding the sender's struct as it is would sign other bytes than the receiver checks.
    """
    try:
        typed = msgspec.msgpack.decode(_canonical.encode(msg), type=type(msg))
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"a {type(msg).__name__} outside its schema cannot be signed or sent: {exc}") from exc
    return _canonical.encode(typed)


def signed_bytes(msg: Signed) -> bytes:
    """The bytes a signature covers: domain tag, message type, canonical encoding without the signature."""
    tag = type(msg).__struct_config__.tag
    return DOMAIN + str(tag).encode() + b"\x00" + _canonical_bytes(msgspec.structs.replace(msg, signature=b""))


class MessageSigner:
    """Signs the coordinator's messages with its Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def from_file(cls, path: str | Path) -> MessageSigner:
        """Load a PEM (PKCS#8) Ed25519 private key.

        Raises:
            ConfigError: unreadable, or not an Ed25519 private key.
        """
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the task-signing key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, msg: S) -> S:
        """The message with its signature filled in."""
        return msgspec.structs.replace(msg, signature=self._key.sign(signed_bytes(msg)))

    def public_pem(self) -> str:
        return public_key_pem(self._key.public_key())


class MessageVerifier:
    """Checks the coordinator's signature on a message a device received."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_pem(cls, text: str) -> MessageVerifier:
        """From PEM text, or a path to a PEM file.

        Raises:
            ConfigError: unreadable, or not an Ed25519 public key.
        """
        data = text.encode() if text.lstrip().startswith("-----BEGIN") else None
        try:
            if data is None:
                data = Path(text).expanduser().read_bytes()
            key = serialization.load_pem_public_key(data)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: `~user` of no such user
            raise ConfigError(f"cannot read the task-signing public key {text[:80]!r}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("the task-signing public key is not an Ed25519 key")
        return cls(key)

    def verify(self, msg: Signed) -> None:
        """Raises ProtocolError naming why when the signature is missing or does not match."""
        if not msg.signature:
            raise ProtocolError(f"unsigned {type(msg).__name__}: this device only obeys signed messages")
        if len(msg.signature) != SIGNATURE_BYTES:
            raise ProtocolError(f"{type(msg).__name__} signature is {len(msg.signature)} bytes, not {SIGNATURE_BYTES}")
        try:
            self._key.verify(msg.signature, signed_bytes(msg))
        except InvalidSignature:
            raise ProtocolError(
                f"{type(msg).__name__} signature does not verify: altered, or not from this coordinator"
            ) from None


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def generate_signing_key(private_path: Path, public_path: Path) -> MessageSigner:
    """A new Ed25519 key pair: the private key written 0600, the public key 0644. Returns its signer."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_secret(private_path, pem)
    public_path.write_text(public_key_pem(key.public_key()), encoding="utf-8")
    return MessageSigner(key)


def reply_bytes(msg: Reply) -> bytes:
    """The bytes a result MAC covers: domain tag, message type, canonical encoding without the MAC."""
    tag = type(msg).__struct_config__.tag
    return RESULT_DOMAIN + str(tag).encode() + b"\x00" + _canonical_bytes(msgspec.structs.replace(msg, mac=b""))


class ResultAuthenticator:
    """One device's result key: the device seals its replies, the coordinator checks them."""

    def __init__(self, key: bytes) -> None:
        if len(key) != RESULT_KEY_BYTES:
            raise ConfigError(f"a result key is {RESULT_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    @classmethod
    def from_text(cls, text: str) -> ResultAuthenticator:
        """From the key in hex, or a path to a file holding it in hex.

        Raises:
            ConfigError: unreadable, or not 32 bytes of hex.
        """
        value = text.strip()
        if len(value) != 2 * RESULT_KEY_BYTES or not all(c in "0123456789abcdefABCDEF" for c in value):
            try:
                value = Path(value).expanduser().read_text(encoding="utf-8").strip()
            except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: `~user` of no such user
                raise ConfigError(f"cannot read the result key {text[:80]!r}: {exc}") from exc
        try:
            return cls(bytes.fromhex(value))
        except ValueError as exc:
            raise ConfigError(f"the result key is not {RESULT_KEY_BYTES} bytes of hex: {exc}") from exc

    def seal(self, msg: R) -> R:
        """The reply with its MAC filled in."""
        return msgspec.structs.replace(msg, mac=hmac.new(self._key, reply_bytes(msg), hashlib.sha256).digest())

    def check(self, msg: Reply) -> None:
        """Raises ProtocolError naming why when the MAC is missing or does not match."""
        if not msg.mac:
            raise ProtocolError(f"unauthenticated {type(msg).__name__}: results must carry the device's MAC")
        expected = hmac.new(self._key, reply_bytes(msg), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, msg.mac):
            raise ProtocolError(f"{type(msg).__name__} MAC does not match: altered, or not from this device")


def generate_result_key(path: Path) -> str:
    """A new random result key, written in hex to `path` (0600). Returns the hex."""
    value = secrets.token_hex(RESULT_KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_secret(path, (value + "\n").encode())
    return value


def _write_secret(path: Path, data: bytes) -> None:
    """Write a key file 0600 from its first byte: a new file (an old one, or a link in its place, is removed first)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)
