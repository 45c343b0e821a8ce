"""CIFAR-10 in its binary batch format."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from msfusion.data.datasets import ArrayDataset
from msfusion.errors import DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def read_cifar_records(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch, memory-mapped: uint8 images (N, 3, 32, 32) and int64 labels."""
    record = 1 + 3 * 32 * 32
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from exc
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR-10 records")
    rows = raw.reshape(-1, record)
    labels = rows[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} out of range 0..9")
    return rows[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Load CIFAR-10 from its binary version (`cifar-10-batches-bin`).

    Args:
        root: folder holding `data_batch_1.bin` .. `data_batch_5.bin` and
            `test_batch.bin` (or its `cifar-10-batches-bin` subfolder).

    Returns:
        (train, test): x float32 (N, 3, 32, 32) normalized per channel, y int64 (N,).

    Raises:
        DataError: a missing or malformed file.
    """
    root = Path(root)
    if not (root / "test_batch.bin").is_file() and (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[None, :, None, None]
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[None, :, None, None]

    def load(names: Iterable[str]) -> ArrayDataset:
        parts = []
        for name in names:
            if not (root / name).is_file():
                raise DataError(f"missing CIFAR-10 file {root / name} (the binary version, cifar-10-binary.tar.gz)")
            parts.append(read_cifar_records(root / name))
        images = np.concatenate([p[0] for p in parts])
        x = (images.astype(np.float32) / 255.0 - mean) / std
        return ArrayDataset(x.astype(np.float32), np.concatenate([p[1] for p in parts]))

    return load(f"data_batch_{i}.bin" for i in range(1, 6)), load(["test_batch.bin"])
