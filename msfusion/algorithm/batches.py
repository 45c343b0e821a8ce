"""Seeded mini-batch order, shared by the device runtime and the reference engine (numpy only).

Both sides draw the same batches from the same seed, so an on-device run and
the in-process reference engine can be compared step by step. Batches have a
fixed size (exported training programs have static shapes): the last partial
batch of an epoch is dropped.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import numpy.typing as npt

from msfusion.errors import ConfigError


def samples_per_epoch(n_samples: int, batch_size: int, max_samples: int = 0) -> int:
    """Samples trained per epoch: min(n, max_samples) rounded down to whole batches."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    usable = n_samples if max_samples <= 0 else min(n_samples, max_samples)
    return (usable // batch_size) * batch_size


def batch_indices(
    n_samples: int, batch_size: int, epochs: int, seed: int, max_samples: int = 0
) -> Iterator[npt.NDArray[np.int64]]:
    """Yield index arrays of `batch_size` samples, epoch by epoch.

    Each epoch draws a fresh permutation from (seed, epoch) and keeps its first
    `max_samples` entries (0 = all).

    Raises:
        ConfigError: fewer samples than one batch.
    """
    per_epoch = samples_per_epoch(n_samples, batch_size, max_samples)
    if per_epoch == 0:
        raise ConfigError(f"{n_samples} samples cannot fill one batch of {batch_size}")
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_samples)[:per_epoch]
        for start in range(0, per_epoch, batch_size):
            yield order[start : start + batch_size].astype(np.int64)
