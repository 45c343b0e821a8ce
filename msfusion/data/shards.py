"""The on-device data shard: one folder per device's local data (numpy only, no torch).

Format (version 1), a folder holding two files:

- `shard.npz`: an uncompressed numpy archive with exactly two arrays, `x`
  (inputs: float32 (N, C, H, W) images or int64 (N, T) character windows) and
  `y` (targets: int64 (N,) labels or (N, T) next characters). Read with
  `allow_pickle=False`: object arrays are refused.
- `meta.json`: a UTF-8 JSON object::

    {"format_version": 1, "name": "fmnist-dev3", "task": "classification",
     "n_samples": 7500, "x_dtype": "float32", "x_shape": [7500, 1, 28, 28],
     "y_dtype": "int64", "y_shape": [7500], "created": "2026-01-01T12:00:00+00:00",
     "extra": {...}}

  `task` is "classification" or "lm"; `extra` holds any further JSON values
  the writer passed (partition, seed, source data set ...).

Both files are written to temporary names and renamed into place, so a
reader never sees a half-written shard. `read_shard` checks that the arrays
agree with `meta.json` and raises `DataError` otherwise.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from msfusion.atomic import atomic_write
from msfusion.errors import DataError

FORMAT_VERSION = 1
DATA_FILE = "shard.npz"
META_FILE = "meta.json"
TASKS = ("classification", "lm")


@dataclass(frozen=True)
class ShardMeta:
    """What `meta.json` records about a shard."""

    name: str
    task: str
    n_samples: int
    x_dtype: str
    x_shape: tuple[int, ...]
    y_dtype: str
    y_shape: tuple[int, ...]
    created: str
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)


def write_shard(directory: str | Path, x: np.ndarray, y: np.ndarray, meta: Mapping[str, Any]) -> ShardMeta:
    """Write one device's data as a shard folder.

    Args:
        directory: the shard folder (created if missing; an old shard is replaced).
        x: inputs, (N, ...).
        y: targets, (N, ...).
        meta: must hold "name" (str) and "task" ("classification" or "lm");
            any other JSON-serializable keys are kept under "extra".

    Returns:
        The metadata written.

    Raises:
        DataError: x and y disagree in length, object arrays, or bad metadata.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DataError(f"x {x.shape} and y {y.shape} must hold the same number of samples")
    if x.dtype == object or y.dtype == object:
        raise DataError("shards hold numeric arrays only, not object arrays")
    name, task = meta.get("name"), meta.get("task")
    if not isinstance(name, str) or not name:
        raise DataError(f"shard meta needs a non-empty 'name', got {name!r}")
    if task not in TASKS:
        raise DataError(f"shard meta 'task' must be one of {TASKS}, got {task!r}")
    extra = {k: v for k, v in meta.items() if k not in ("name", "task")}
    info = ShardMeta(
        name=name,
        task=str(task),
        n_samples=int(len(x)),
        x_dtype=str(x.dtype),
        x_shape=tuple(int(d) for d in x.shape),
        y_dtype=str(y.dtype),
        y_shape=tuple(int(d) for d in y.shape),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra=extra,
    )
    try:
        text = json.dumps(asdict(info), indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise DataError(f"shard meta is not JSON-serializable: {exc}") from exc
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / DATA_FILE, lambda handle: np.savez(handle, x=x, y=y))
    atomic_write(folder / META_FILE, lambda handle: handle.write(text.encode("utf-8")))
    return info


def _parse_meta(path: Path) -> ShardMeta:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"shard metadata {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"shard metadata {path} is unreadable: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {raw.get('format_version')!r}, this reader knows {FORMAT_VERSION}")
    try:
        meta = ShardMeta(
            name=str(raw["name"]),
            task=str(raw["task"]),
            n_samples=int(raw["n_samples"]),
            x_dtype=str(raw["x_dtype"]),
            x_shape=tuple(int(d) for d in raw["x_shape"]),
            y_dtype=str(raw["y_dtype"]),
            y_shape=tuple(int(d) for d in raw["y_shape"]),
            created=str(raw["created"]),
            format_version=FORMAT_VERSION,
            extra=dict(raw.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: missing or malformed field ({exc!r})") from exc
    if meta.task not in TASKS:
        raise DataError(f"{path}: unknown task {meta.task!r}")
    return meta


def read_shard(directory: str | Path) -> tuple[np.ndarray, np.ndarray, ShardMeta]:
    """Read and check a shard folder.

    Args:
        directory: the shard folder.

    Returns:
        (x, y, meta).

    Raises:
        DataError: a missing or corrupt file, or arrays that disagree with meta.json.
    """
    folder = Path(directory)
    meta = _parse_meta(folder / META_FILE)
    data_path = folder / DATA_FILE
    try:
        with np.load(data_path, allow_pickle=False) as archive:
            if set(archive.files) != {"x", "y"}:
                raise DataError(f"{data_path}: expected arrays x and y, found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except FileNotFoundError:
        raise DataError(f"shard data {data_path} is missing") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"shard data {data_path} is corrupt: {exc}") from exc
    for label, array, dtype, shape in (("x", x, meta.x_dtype, meta.x_shape), ("y", y, meta.y_dtype, meta.y_shape)):
        if str(array.dtype) != dtype or tuple(array.shape) != shape:
            raise DataError(f"{data_path}: {label} is {array.dtype} {array.shape}, meta.json says {dtype} {shape}")
    if len(x) != meta.n_samples or len(y) != meta.n_samples:
        raise DataError(f"{data_path}: holds {len(x)} samples, meta.json says {meta.n_samples}")
    return x, y, meta
