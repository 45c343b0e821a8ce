"""Partition a data set over devices: IID, Dirichlet label skew, label shards, natural clients.

Pure functions: the same inputs and the same `numpy.random.Generator` state
give the same partition. The sample partitioners return one sorted int64
index array per device and assign every sample exactly once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import numpy.typing as npt

from msfusion.errors import ConfigError

IndexArray = npt.NDArray[np.int64]
_MAX_DIRICHLET_TRIES = 1000


def _check_devices(n_items: int, n_devices: int, what: str) -> None:
    if n_devices < 1:
        raise ConfigError(f"n_devices must be >= 1, got {n_devices}")
    if n_items < n_devices:
        raise ConfigError(f"cannot give {n_devices} devices at least one of {n_items} {what}")


def iid(n: int, n_devices: int, rng: np.random.Generator) -> list[IndexArray]:
    """Shuffle `n` samples and deal them out in near-equal parts.

    Args:
        n: number of samples.
        n_devices: number of devices.
        rng: random generator.

    Returns:
        One sorted index array per device; sizes differ by at most one.

    Raises:
        ConfigError: fewer samples than devices.
    """
    _check_devices(n, n_devices, "samples")
    parts = np.array_split(rng.permutation(n).astype(np.int64), n_devices)
    return [np.sort(part) for part in parts]


def dirichlet(
    labels: npt.ArrayLike,
    n_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[IndexArray]:
    """Label-skewed split: each class is shared out by Dirichlet(alpha) proportions.

    The usual non-IID benchmark split (as in MOON and FedLab): per class,
    device shares are drawn from Dirichlet(alpha); a device already holding
    more than n / n_devices samples gets no more. The draw is repeated until
    every device holds at least `min_size` samples.

    Args:
        labels: integer class label per sample, (N,).
        n_devices: number of devices.
        alpha: concentration; small is skewed, large is near IID.
        rng: random generator.
        min_size: fewest samples any device may get.

    Returns:
        One sorted index array per device.

    Raises:
        ConfigError: bad arguments, or no draw met `min_size` within 1000 tries.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {labels.shape}")
    _check_devices(len(labels), n_devices, "samples")
    if alpha <= 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if min_size * n_devices > len(labels):
        raise ConfigError(f"{n_devices} devices x min_size {min_size} exceeds {len(labels)} samples")
    n, cap = len(labels), len(labels) / n_devices
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[IndexArray]] = [[] for _ in range(n_devices)]
        sizes = np.zeros(n_devices, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(n_devices, alpha))
            shares = np.where(sizes < cap, shares, 0.0)
            if shares.sum() == 0.0:  # every device is full: share evenly
                shares = np.ones(n_devices)
            cuts = (np.cumsum(shares / shares.sum()) * len(members)).astype(np.int64)[:-1]
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].append(chunk)
                sizes[device] += len(chunk)
        if sizes.min() >= min_size:
            out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
            if sum(len(p) for p in out) != n:  # cannot happen: np.split covers every member
                raise ConfigError("internal error: Dirichlet split lost samples")
            return out
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {n_devices} devices "
        f"{min_size} samples in {_MAX_DIRICHLET_TRIES} tries; raise alpha or lower min_size"
    )


def label_shards(
    labels: npt.ArrayLike, n_devices: int, shards_per_device: int, rng: np.random.Generator
) -> list[IndexArray]:
    """Pathological non-IID split (FedAvg paper): sort by label, cut into shards, deal shards.

    Args:
        labels: integer class label per sample, (N,).
        n_devices: number of devices.
        shards_per_device: shards each device receives.
        rng: random generator.

    Returns:
        One sorted index array per device.

    Raises:
        ConfigError: bad arguments or more shards than samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {labels.shape}")
    if shards_per_device < 1:
        raise ConfigError(f"shards_per_device must be >= 1, got {shards_per_device}")
    n_shards = n_devices * shards_per_device
    _check_devices(len(labels), n_devices, "samples")
    if n_shards > len(labels):
        raise ConfigError(f"{n_shards} shards exceed {len(labels)} samples")
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]  # random order within a class
    shards = np.array_split(by_label.astype(np.int64), n_shards)
    order = rng.permutation(n_shards)
    return [
        np.sort(np.concatenate([shards[s] for s in order[d * shards_per_device : (d + 1) * shards_per_device]]))
        for d in range(n_devices)
    ]


def natural(
    client_ids: Sequence[str],
    n_devices: int,
    rng: np.random.Generator,
    sizes: Sequence[int] | None = None,
) -> list[list[str]]:
    """Deal whole clients (e.g. Shakespeare roles) to devices, balancing their size.

    Greedy longest-first: clients in decreasing size (ties in random order)
    each go to the device holding the least so far.

    Args:
        client_ids: the clients.
        n_devices: number of devices.
        rng: random generator (breaks ties).
        sizes: characters or samples per client (default: 1 each).

    Returns:
        One list of client ids per device, each sorted.

    Raises:
        ConfigError: fewer clients than devices, duplicate ids, or sizes of the wrong length.
    """
    _check_devices(len(client_ids), n_devices, "clients")
    if len(set(client_ids)) != len(client_ids):
        raise ConfigError("client ids must be unique")
    weights = np.ones(len(client_ids), dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if weights.shape != (len(client_ids),) or (weights < 0).any():
        raise ConfigError(f"sizes must be {len(client_ids)} non-negative counts")
    shuffled = rng.permutation(len(client_ids))
    order = shuffled[np.argsort(-weights[shuffled], kind="stable")]
    loads = np.zeros(n_devices, dtype=np.int64)
    counts = np.zeros(n_devices, dtype=np.int64)
    out: list[list[str]] = [[] for _ in range(n_devices)]
    for i in order:
        device = int(np.lexsort((counts, loads))[0])  # least loaded, then fewest clients
        out[device].append(client_ids[i])
        loads[device] += weights[i]
        counts[device] += 1
    return [sorted(clients) for clients in out]
