"""Mosquitto 2.0 password files, written without `mosquitto_passwd`.

One line per user::

    <username>:$7$<iterations>$<base64 salt>$<base64 hash>

``$7$`` is PBKDF2-HMAC-SHA512 over the UTF-8 password with a 12-byte random
salt, 64 bytes of output, 101 iterations by default (Mosquitto's
``PW_DEFAULT_ITERATIONS``); both base64 fields are standard base64 with
padding, as `mosquitto_passwd` writes them (src/password_mosq.c,
apps/mosquitto_passwd/mosquitto_passwd.c). Mosquitto also reads the older
``$6$<salt>$<hash>`` form (one SHA-512 over password then salt), which
`verify_password` accepts too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Mapping

from msfusion.errors import ConfigError

ITERATIONS = 101
SALT_LEN = 12
HASH_LEN = 64


def check_username(username: str) -> str:
    """A username fit for a password file line (no ':', no whitespace or control characters, not empty).

    Raises:
        ConfigError: it is not.
    """
    if not username or ":" in username or any(c.isspace() or ord(c) < 32 for c in username):
        raise ConfigError(f"username {username!r} cannot go in a Mosquitto password file")
    return username


def _check_password(password: str) -> bytes:
    raw = password.encode("utf-8")
    if not raw or b"\0" in raw or b"\n" in raw:
        raise ConfigError("a password must be non-empty, without NUL or newline characters")
    return raw


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """``$7$<iterations>$<b64 salt>$<b64 hash>`` for `password` (a fresh random salt unless given).

    Raises:
        ConfigError: an empty password, a NUL or newline in it, a salt not 12 bytes, iterations < 1.
    """
    raw = _check_password(password)
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    if len(salt) != SALT_LEN:
        raise ConfigError(f"a Mosquitto password salt is {SALT_LEN} bytes, got {len(salt)}")
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    digest = hashlib.pbkdf2_hmac("sha512", raw, salt, iterations, HASH_LEN)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_line(username: str, password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """One password-file line, without its newline."""
    return f"{check_username(username)}:{hash_password(password, iterations=iterations, salt=salt)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches an encoded ``$7$...`` (or ``$6$...``) hash, as Mosquitto checks it."""
    parts = encoded.split("$")
    try:
        raw = _check_password(password)
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
            if iterations < 1 or len(salt) != SALT_LEN or len(expected) != HASH_LEN:
                return False
            actual = hashlib.pbkdf2_hmac("sha512", raw, salt, iterations, HASH_LEN)
        elif len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            salt, expected = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
            actual = hashlib.sha512(raw + salt).digest()
        else:
            return False
    except (ValueError, ConfigError):
        return False
    return hmac.compare_digest(actual, expected)


def generate_password(nbytes: int = 24) -> str:
    """A random password (URL-safe base64 of `nbytes` random bytes: 32 characters by default)."""
    return secrets.token_urlsafe(nbytes)


def parse_password_file(text: str) -> dict[str, str]:
    """username -> encoded hash, in file order; blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: a line without ':'.
    """
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, encoded = line.partition(":")
        if not sep:
            raise ConfigError(f"password file line {number}: expected username:hash")
        entries[username] = encoded
    return entries


def format_password_file(entries: Mapping[str, str]) -> str:
    """The file text for username -> encoded hash (one line each, a final newline)."""
    return "".join(f"{check_username(user)}:{encoded}\n" for user, encoded in entries.items())


def read_password_file(path: Path) -> dict[str, str]:
    """`parse_password_file` of a file; a missing file is empty."""
    return parse_password_file(path.read_text(encoding="utf-8")) if path.exists() else {}
