"""Partitioners: every sample exactly once, the skew each promises, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from msfusion.data.partition import dirichlet, iid, label_shards, natural
from msfusion.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def _classes_held(parts: list[np.ndarray], labels: np.ndarray, min_share: float) -> list[int]:
    return [int((np.bincount(labels[p], minlength=10) / len(p) >= min_share).sum()) for p in parts]


def test_iid_covers_every_sample_once_in_near_equal_parts() -> None:
    parts = iid(1003, 8, np.random.default_rng(0))
    _assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {125, 126}
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_partitions_are_deterministic_given_the_generator() -> None:
    for split in (
        lambda rng: iid(500, 4, rng),
        lambda rng: dirichlet(LABELS, 4, 0.5, rng),
        lambda rng: label_shards(LABELS, 4, 2, rng),
    ):
        a, b, c = split(np.random.default_rng(7)), split(np.random.default_rng(7)), split(np.random.default_rng(8))
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_covers_every_sample_once_and_respects_min_size(alpha: float) -> None:
    parts = dirichlet(LABELS, 8, alpha, np.random.default_rng(1), min_size=20)
    _assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_skew_follows_alpha() -> None:
    rng = np.random.default_rng(2)
    skewed = _classes_held(dirichlet(LABELS, 8, 0.1, rng), LABELS, 0.05)
    even = _classes_held(dirichlet(LABELS, 8, 100.0, rng), LABELS, 0.05)
    assert np.mean(skewed) < 5 and np.mean(even) == 10


def test_dirichlet_refuses_impossible_requests() -> None:
    with pytest.raises(ConfigError, match="min_size"):
        dirichlet(LABELS, 8, 0.5, np.random.default_rng(0), min_size=200)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet(LABELS, 8, 0.0, np.random.default_rng(0))


def test_label_shards_give_each_device_few_classes() -> None:
    parts = label_shards(LABELS, 10, 2, np.random.default_rng(3))
    _assert_exact_cover(parts, len(LABELS))
    assert all(len(p) == 100 for p in parts)
    # 20 shards of 50 samples, each cut from one class: at most 2 classes per device.
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 2
    with pytest.raises(ConfigError):
        label_shards(LABELS, 10, 200, np.random.default_rng(3))


def test_natural_deals_whole_clients_and_balances_size() -> None:
    # Prepare
    rng = np.random.default_rng(4)
    clients = [f"play{i // 10}/ROLE{i % 10}" for i in range(60)]
    sizes = rng.integers(10, 2000, size=60)
    size_of = dict(zip(clients, sizes))
    # Execute
    parts = natural(clients, 4, np.random.default_rng(5), sizes=sizes)
    # Assert
    assert sorted(c for part in parts for c in part) == sorted(clients)
    loads = [sum(int(size_of[c]) for c in part) for part in parts]
    assert max(loads) - min(loads) <= int(sizes.max())
    assert parts == natural(clients, 4, np.random.default_rng(5), sizes=sizes)


def test_natural_without_sizes_balances_client_counts_and_checks_arguments() -> None:
    parts = natural([f"c{i}" for i in range(10)], 3, np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    with pytest.raises(ConfigError):
        natural(["a", "b"], 3, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        natural(["a", "a", "b"], 2, np.random.default_rng(0))
    with pytest.raises(ConfigError):
        natural(["a", "b"], 2, np.random.default_rng(0), sizes=[1])
