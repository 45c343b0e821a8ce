"""Writing the security folder's files with the right owner and mode, atomically.

A Mosquitto started as root drops its privileges to user ``mosquitto`` and
re-reads its config, password file, ACL and certificates as that user on
SIGHUP. So the files the broker reads are owned by that user (when this
process runs as root and the user exists) with modes 0600/0640, never
world-readable; the files only the coordinator or a device needs (the CA key,
client keys) stay owned by whoever runs `msfusion security`, mode 0600.
"""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

BROKER_USER = "mosquitto"  # Mosquitto's default `user`

SECRET = 0o600  # private keys, the password file
BROKER_CONFIG = 0o640  # mosquitto.conf, the ACL: not secret, but nobody else's business
PUBLIC = 0o644  # certificates, the revocation list


def broker_owner(user: str | None = BROKER_USER) -> tuple[int, int] | None:
    """(uid, gid) to give the broker's files: `user`'s when this process is root and `user` exists, else None."""
    if user is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def write_file(path: Path, data: bytes | str, mode: int, owner: tuple[int, int] | None = None) -> Path:
    """Write `data` to `path` atomically (a temporary file renamed over it) with `mode` and `owner`.

    The temporary file has `mode` from its creation, so a secret is never readable by others,
    and a broker re-reading the file on SIGHUP sees the old or the new text, never half of one.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def make_dir(path: Path, mode: int, owner: tuple[int, int] | None = None, *, group_only: bool = False) -> Path:
    """Create `path` (if needed) and set its mode; `owner`: chown it, or with `group_only` only its group."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, -1 if group_only else owner[0], owner[1])
    return path
