"""The device's on-disk memory: tasks handled, the last reply, and the previous local slice (numpy only).

It makes the daemon idempotent per (run, round, device, task) and lets it
survive its own restart: a redelivered task that was handled gets the very
same reply again, and the previous local slice (the contrastive negative)
is still there after a crash.

Layout under the state folder::

    ledger.json                  {"handled": [[run, round, device, task], ...], "last": "<dir>" | null}
    replies/<n>/reply.msgpack    the encoded SliceResult or TaskFailed
    replies/<n>/slice.safetensors  the trained slice, byte for byte as sent (results only)
    replies/<n>/index.json       {"units": {group: [...]}, "axes": {tensor: [[axis, group, unit_size]]}}

A reply folder is written completely before `ledger.json` is atomically
replaced to point at it, so a crash leaves either the old or the new record.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msfusion.algorithm.indexing import TensorIndex, expand_units
from msfusion.atomic import atomic_write
from msfusion.errors import ArtifactError
from msfusion.wire.protocol import AxisUnits
from msfusion.wire.weights import Weights, unpack_weights

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
KEEP_HANDLED = 256  # task keys remembered; older redeliveries are long stale
TaskKey = tuple[str, int, str, str]


@dataclass(frozen=True)
class StoredReply:
    """The last reply sent, as it can be sent again."""

    key: TaskKey
    reply: bytes  # encoded SliceResult or TaskFailed
    slice_bytes: bytes | None  # the packed slice of a SliceResult


def slice_index(units: Mapping[str, Sequence[int]], axes: Mapping[str, Sequence[AxisUnits]]) -> dict[str, TensorIndex]:
    """Per tensor, axis -> full-tensor element indices of a task's sub-model (as the spec computes them)."""
    index: dict[str, TensorIndex] = {}
    for tensor, tensor_axes in axes.items():
        index[tensor] = {
            a.axis: expand_units(np.asarray(units[a.group], dtype=np.int64), a.unit_size) for a in tensor_axes
        }
    return index


class Ledger:
    """Handled task keys, the last reply and the previous local slice, kept in `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        (self.dir / "replies").mkdir(parents=True, exist_ok=True)
        self._handled: list[TaskKey] = []
        self._last: str | None = None
        self._load()

    def _load(self) -> None:
        path = self.dir / LEDGER_FILE
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._handled = [(str(r), int(n), str(d), str(t)) for r, n, d, t in raw["handled"]]
            self._last = raw["last"]
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ledger %s is unreadable (%s); starting with an empty one", path, exc)
            self._handled, self._last = [], None

    def handled(self, key: TaskKey) -> bool:
        """Whether a task with this key was answered already."""
        return key in self._handled

    def last_reply(self) -> StoredReply | None:
        """The last reply, to send again when its task is redelivered."""
        if self._last is None or not self._handled:
            return None
        folder = self.dir / "replies" / self._last
        try:
            reply = (folder / "reply.msgpack").read_bytes()
            slice_path = folder / "slice.safetensors"
            slice_bytes = slice_path.read_bytes() if slice_path.exists() else None
        except OSError as exc:
            log.error("cannot read the last reply in %s: %s", folder, exc)
            return None
        return StoredReply(self._handled[-1], reply, slice_bytes)

    def previous_slice(self) -> tuple[Weights, dict[str, TensorIndex]] | None:
        """The last trained local slice and its element indices (None before the first)."""
        if self._last is None:
            return None
        for name in self._reply_dirs_newest_first():
            folder = self.dir / "replies" / name
            # A folder newer than the ledger's pointer is a reply that was never recorded (a crash).
            if int(name) <= int(self._last) and (folder / "slice.safetensors").exists():
                try:
                    weights = unpack_weights((folder / "slice.safetensors").read_bytes())
                    raw = json.loads((folder / "index.json").read_text(encoding="utf-8"))
                except (OSError, ValueError, ArtifactError) as exc:
                    log.error("previous slice in %s is unreadable: %s", folder, exc)
                    return None
                axes = {t: [AxisUnits(axis=a, group=g, unit_size=u) for a, g, u in v] for t, v in raw["axes"].items()}
                return weights, slice_index(raw["units"], axes)
        return None

    def _reply_dirs_newest_first(self) -> list[str]:
        names = [p.name for p in (self.dir / "replies").iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(names, key=int, reverse=True)

    def record(
        self,
        key: TaskKey,
        reply: bytes,
        slice_bytes: bytes | None = None,
        units: Mapping[str, Sequence[int]] | None = None,
        axes: Mapping[str, Sequence[AxisUnits]] | None = None,
    ) -> None:
        """Remember a reply (and its slice, which becomes the previous local slice) atomically."""
        names = self._reply_dirs_newest_first()
        name = str(int(names[0]) + 1 if names else 0)
        folder = self.dir / "replies" / name
        folder.mkdir()
        atomic_write(folder / "reply.msgpack", reply)
        if slice_bytes is not None:
            index = {
                "units": {g: [int(u) for u in us] for g, us in (units or {}).items()},
                "axes": {t: [[a.axis, a.group, a.unit_size] for a in v] for t, v in (axes or {}).items()},
            }
            atomic_write(folder / "index.json", json.dumps(index).encode("utf-8"))
            atomic_write(folder / "slice.safetensors", slice_bytes)
        handled = [k for k in self._handled if k != key] + [key]
        handled = handled[-KEEP_HANDLED:]
        state = {"handled": [list(k) for k in handled], "last": name}
        atomic_write(self.dir / LEDGER_FILE, json.dumps(state).encode("utf-8"))
        self._handled, self._last = handled, name
        self._prune(keep=name)

    def _prune(self, keep: str) -> None:
        """Keep the newest reply folder and the newest one holding a slice; drop the rest."""
        newest_slice = None
        for name in self._reply_dirs_newest_first():
            if (self.dir / "replies" / name / "slice.safetensors").exists():
                newest_slice = name
                break
        for name in self._reply_dirs_newest_first():
            if name not in (keep, newest_slice):
                shutil.rmtree(self.dir / "replies" / name, ignore_errors=True)
