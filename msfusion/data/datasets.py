"""The in-memory data set every loader returns, and where data files live.

Loaders (`idx.py`, `cifar.py`, `shakespeare.py`) only read files that are
already on disk; nothing is downloaded. Images come out float32 (N, C, H, W),
normalized; labels int64 (N,). Text comes out as a `TextCorpus` that cuts
int64 (N, context) windows with targets shifted by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from msfusion.errors import DataError


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs and targets as numpy arrays, aligned on axis 0.

    Attributes:
        x: inputs, e.g. float32 (N, C, H, W) images or int64 (N, T) windows.
        y: targets, int64 (N,) labels or (N, T) next characters.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x holds {len(self.x)} samples but y holds {len(self.y)}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: Sequence[int] | np.ndarray) -> ArrayDataset:
        """The samples at `idx` (copies), in that order."""
        index = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(self.x[index], self.y[index])


def default_data_dir() -> Path:
    """Where data files live: $MSFUSION_DATA, else `<repo>/data`."""
    env = os.environ.get("MSFUSION_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data"
