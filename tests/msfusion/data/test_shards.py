"""Device data shards: round trip, checks against meta.json, corrupt files, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msfusion.data.shards import DATA_FILE, META_FILE, read_shard, write_shard
from msfusion.errors import DataError


@pytest.fixture()
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 1, 4, 4)).astype(np.float32), rng.integers(0, 10, 6).astype(np.int64)


def test_round_trip_keeps_arrays_and_meta(tmp_path: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    # Prepare
    x, y = images
    # Execute
    written = write_shard(tmp_path / "dev0", x, y, {"name": "fmnist-dev0", "task": "classification", "seed": 3})
    got_x, got_y, meta = read_shard(tmp_path / "dev0")
    # Assert
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert meta == written
    assert (meta.name, meta.task, meta.n_samples) == ("fmnist-dev0", "classification", 6)
    assert (meta.x_dtype, meta.x_shape, meta.y_dtype, meta.y_shape) == ("float32", (6, 1, 4, 4), "int64", (6,))
    assert meta.extra == {"seed": 3} and meta.created.endswith("+00:00")
    assert sorted(p.name for p in (tmp_path / "dev0").iterdir()) == [META_FILE, DATA_FILE]


def test_text_windows_round_trip(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.int64).reshape(5, 8)
    write_shard(tmp_path, x, x + 1, {"name": "lm", "task": "lm"})
    got_x, got_y, meta = read_shard(tmp_path)
    np.testing.assert_array_equal(got_y, x + 1)
    assert meta.task == "lm" and meta.y_shape == (5, 8)


@pytest.mark.parametrize("missing", [DATA_FILE, META_FILE])
def test_missing_file_is_a_data_error(tmp_path: Path, images: tuple[np.ndarray, np.ndarray], missing: str) -> None:
    write_shard(tmp_path, *images, {"name": "s", "task": "classification"})
    (tmp_path / missing).unlink()
    with pytest.raises(DataError, match="missing"):
        read_shard(tmp_path)


def test_corrupt_data_file_is_a_data_error(tmp_path: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    write_shard(tmp_path, *images, {"name": "s", "task": "classification"})
    (tmp_path / DATA_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="corrupt"):
        read_shard(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("x_shape", [6, 1, 4, 5], "meta.json says"),
        ("y_dtype", "int32", "meta.json says"),
        ("n_samples", 7, "meta.json says 7"),
        ("format_version", 2, "format_version"),
        ("task", "regression", "unknown task"),
    ],
)
def test_meta_that_disagrees_is_a_data_error(
    tmp_path: Path, images: tuple[np.ndarray, np.ndarray], field: str, value: object, message: str
) -> None:
    write_shard(tmp_path, *images, {"name": "s", "task": "classification"})
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta[field] = value
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        read_shard(tmp_path)


def test_unparsable_meta_is_a_data_error(tmp_path: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    write_shard(tmp_path, *images, {"name": "s", "task": "classification"})
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        read_shard(tmp_path)


def test_write_refuses_bad_input(tmp_path: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = images
    with pytest.raises(DataError, match="same number"):
        write_shard(tmp_path, x, y[:5], {"name": "s", "task": "classification"})
    with pytest.raises(DataError, match="task"):
        write_shard(tmp_path, x, y, {"name": "s", "task": "regression"})
    with pytest.raises(DataError, match="name"):
        write_shard(tmp_path, x, y, {"task": "lm"})
    with pytest.raises(DataError, match="JSON"):
        write_shard(tmp_path, x, y, {"name": "s", "task": "lm", "when": object()})
    assert not (tmp_path / DATA_FILE).exists()


def test_shards_module_does_not_import_torch() -> None:
    code = "import sys, msfusion.data.shards; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
