"""The device's on-disk memory: tasks handled, the last reply, and the previous local slice (numpy only).

It makes the daemon idempotent per (run, round, device, task) and lets it
survive its own restart: a redelivered task that was handled gets the very
same reply again, and the previous local slice (the contrastive negative)
is still there after a crash.

A task names the slice that is its negative by the task that produced it
(`TrainTask.negative_task_id`: the slice the coordinator merged in its last
merged round), and `previous_slice(task_id)` returns that slice only. So a
slice of a discarded attempt, or of another coordinator session (one killed
before its first checkpoint, whose successor starts afresh), is never a
negative: task ids carry their session, and a new session names none of the
old ones.

Layout under the state folder::

    ledger.json                  {"handled": [[run, round, device, task], ...], "last": "<dir>" | null}
    replies/<n>/reply.msgpack    the encoded SliceResult or TaskFailed
    replies/<n>/slice.safetensors  the slice, byte for byte as sent (results only): the trained slice, or
                                 a compressed task's rounded update (`wire/codec.py`)
    replies/<n>/trained.safetensors  a compressed task's trained slice (fp32): the next negative
    replies/<n>/residual.safetensors  an int8 task's error-feedback residual (what rounding took from the update)
    replies/<n>/index.json       {"units": {group: [...]}, "axes": {tensor: [[axis, group, unit_size]]},
                                  "task": [run, round, device, task]}

A reply folder is written completely before `ledger.json` is atomically
replaced to point at it, so a crash leaves either the old or the new record.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

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


@dataclass(frozen=True)
class LocalState:
    """What a compressed task's device keeps beside the uploaded update (`pack_weights` bytes each)."""

    trained: bytes  # the trained slice: the next contrastive negative (the upload holds only the update)
    residual: bytes | None = None  # int8: the error-feedback residual, on the slice's elements


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

    def previous_slice(self, task_id: str | None = None) -> tuple[Weights, dict[str, TensorIndex]] | None:
        """A trained local slice and its element indices.

        Args:
            task_id: the task whose slice to return ("": none); None: the newest slice recorded.

        Returns:
            The slice, or None: none recorded yet, none of that task (pruned, another
            session's, or never trained here), or unreadable.
        """
        found = self._slice_folder(task_id)
        if found is None:
            if task_id:
                log.info("no slice of task %s in %s: training against the global sub-model", task_id, self.dir)
            return None
        folder, raw = found
        # A compressed task uploaded its update: its trained slice is kept beside it.
        trained = folder / "trained.safetensors"
        try:
            weights = unpack_weights((trained if trained.exists() else folder / "slice.safetensors").read_bytes())
            axes = {t: [AxisUnits(axis=a, group=g, unit_size=u) for a, g, u in v] for t, v in raw["axes"].items()}
            return weights, slice_index(raw["units"], axes)
        except (OSError, ValueError, KeyError, TypeError, ArtifactError) as exc:
            log.error("previous slice in %s is unreadable: %s", folder, exc)
            return None

    def previous_residual(self, task_id: str | None = None) -> Weights | None:
        """The int8 error-feedback residual kept with a task's slice (on that slice's elements: `previous_slice`).

        Returns:
            The residual, or None: that slice has none (not an int8 task), none of that task, or unreadable.
        """
        found = self._slice_folder(task_id)
        if found is None or not (found[0] / "residual.safetensors").exists():
            return None
        try:
            return unpack_weights((found[0] / "residual.safetensors").read_bytes())
        except (OSError, ArtifactError) as exc:
            log.error("residual in %s is unreadable: %s", found[0], exc)
            return None

    def _slice_folder(self, task_id: str | None) -> tuple[Path, dict[str, Any]] | None:
        """The reply folder holding the slice of `task_id` (None: the newest) and its index.json."""
        if self._last is None or task_id == "":
            return None
        for name in self._reply_dirs_newest_first():
            folder = self.dir / "replies" / name
            # A folder newer than the ledger's pointer is a reply that was never recorded (a crash).
            if int(name) > int(self._last) or not (folder / "slice.safetensors").exists():
                continue
            try:
                raw = json.loads((folder / "index.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.error("previous slice in %s is unreadable: %s", folder, exc)
                return None
            if not isinstance(raw, dict):
                log.error("previous slice in %s has a malformed index", folder)
                return None
            if task_id is not None and (not isinstance(raw.get("task"), list) or raw["task"][3:] != [task_id]):
                continue
            return folder, raw
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
        keep_task_id: str = "",
        local: LocalState | None = None,
    ) -> None:
        """Remember a reply (and its slice, which becomes the previous local slice) atomically.

        Args:
            key: the task's key.
            reply: the encoded reply.
            slice_bytes: the packed slice of a result.
            units, axes: the slice's units and split axes (to re-slice it later).
            keep_task_id: a task whose slice is kept as well as the newest one (the task's
                negative: a retry of the round names it again).
            local: a compressed task's trained slice and residual, kept beside its uploaded update.
        """
        names = self._reply_dirs_newest_first()
        name = str(int(names[0]) + 1 if names else 0)
        folder = self.dir / "replies" / name
        folder.mkdir()
        atomic_write(folder / "reply.msgpack", reply)
        if slice_bytes is not None:
            index = {
                "units": {g: [int(u) for u in us] for g, us in (units or {}).items()},
                "axes": {t: [[a.axis, a.group, a.unit_size] for a in v] for t, v in (axes or {}).items()},
                "task": list(key),
            }
            atomic_write(folder / "index.json", json.dumps(index).encode("utf-8"))
            if local is not None:  # before slice.safetensors, which marks the folder as holding a slice
                atomic_write(folder / "trained.safetensors", local.trained)
                if local.residual is not None:
                    atomic_write(folder / "residual.safetensors", local.residual)
            atomic_write(folder / "slice.safetensors", slice_bytes)
        handled = [k for k in self._handled if k != key] + [key]
        handled = handled[-KEEP_HANDLED:]
        state = {"handled": [list(k) for k in handled], "last": name}
        atomic_write(self.dir / LEDGER_FILE, json.dumps(state).encode("utf-8"))
        self._handled, self._last = handled, name
        self._prune(keep=name, keep_task_id=keep_task_id)

    def _prune(self, keep: str, keep_task_id: str = "") -> None:
        """Keep the newest reply folder, the newest one holding a slice and that of `keep_task_id`; drop the rest."""
        kept = {keep}
        newest_slice_found = False
        for name in self._reply_dirs_newest_first():
            folder = self.dir / "replies" / name
            if not (folder / "slice.safetensors").exists():
                continue
            if not newest_slice_found:
                kept.add(name)
                newest_slice_found = True
            elif keep_task_id and _task_of(folder) == keep_task_id:
                kept.add(name)
        for name in self._reply_dirs_newest_first():
            if name not in kept:
                shutil.rmtree(self.dir / "replies" / name, ignore_errors=True)


def _task_of(folder: Path) -> str:
    """The task id a reply folder's slice was trained for ("" when unknown)."""
    try:
        raw = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        return str(raw["task"][3])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""
