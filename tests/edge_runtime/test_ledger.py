"""The device's on-disk ledger: handled tasks, the last reply byte for byte, the previous slice across restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msfusion.algorithm.indexing import expand_units
from msfusion.edge_runtime.ledger import Ledger, slice_index
from msfusion.wire.protocol import AxisUnits
from msfusion.wire.weights import pack_weights

AXES = {
    "l1.weight": [AxisUnits(axis=0, group="a", unit_size=1)],
    "l2.weight": [AxisUnits(axis=1, group="a", unit_size=2)],
}


def _slice(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pack_weights(
        {
            "l1.weight": rng.standard_normal((2, 3)),
            "l2.weight": rng.standard_normal((5, 4)),
            "b": rng.standard_normal(5),
        }
    )


def test_a_handled_task_gets_the_same_reply_and_the_slice_survives_a_restart(tmp_path: Path) -> None:
    # Prepare
    key = ("run", 3, "dev000", "s-r3-a0")
    ledger = Ledger(tmp_path)
    assert not ledger.handled(key) and ledger.previous_slice() is None
    # Execute
    ledger.record(key, b"reply-bytes", _slice(0), {"a": [5, 1]}, AXES)
    restarted = Ledger(tmp_path)
    # Assert
    assert restarted.handled(key)
    stored = restarted.last_reply()
    assert (
        stored is not None and stored.key == key and stored.reply == b"reply-bytes" and stored.slice_bytes == _slice(0)
    )
    previous = restarted.previous_slice()
    assert previous is not None
    weights, index = previous
    assert set(weights) == {"l1.weight", "l2.weight", "b"}
    np.testing.assert_array_equal(index["l2.weight"][1], expand_units(np.array([5, 1]), 2))
    assert "b" not in index


def test_a_failure_reply_keeps_the_previous_slice_and_old_folders_are_pruned(tmp_path: Path) -> None:
    # Prepare
    ledger = Ledger(tmp_path)
    ledger.record(("run", 0, "d", "t0"), b"r0", _slice(0), {"a": [0, 1]}, AXES)
    ledger.record(("run", 1, "d", "t1"), b"r1", _slice(1), {"a": [1, 2]}, AXES)
    # Execute
    ledger.record(("run", 2, "d", "t2"), b"failed")
    # Assert
    stored = ledger.last_reply()
    assert stored is not None and stored.reply == b"failed" and stored.slice_bytes is None
    previous = ledger.previous_slice()
    assert previous is not None
    np.testing.assert_array_equal(previous[1]["l1.weight"][0], [1, 2])
    assert len(list((tmp_path / "replies").iterdir())) == 2
    assert all(ledger.handled(("run", r, "d", f"t{r}")) for r in range(3))


def test_slice_index_matches_the_spec_expansion() -> None:
    index = slice_index({"a": [3, 0]}, AXES)
    np.testing.assert_array_equal(index["l1.weight"][0], [3, 0])
    np.testing.assert_array_equal(index["l2.weight"][1], [6, 7, 0, 1])


def test_a_task_gets_as_negative_only_the_slice_it_names(tmp_path: Path) -> None:
    # Prepare: a killed session's slices, then a retried round of another session
    ledger = Ledger(tmp_path)
    ledger.record(("run", 0, "d", "old-r0-a0"), b"r0", _slice(0), {"a": [0, 1]}, AXES)
    ledger.record(("run", 1, "d", "old-r1-a0"), b"r1", _slice(1), {"a": [1, 2]}, AXES)
    # Execute / Assert: a fresh session names none (its round 0), or one of its own
    assert ledger.previous_slice("") is None
    assert ledger.previous_slice("new-r0-a0") is None
    named = ledger.previous_slice("old-r1-a0")
    assert named is not None
    np.testing.assert_array_equal(named[1]["l1.weight"][0], [1, 2])


def test_the_named_negative_survives_the_slices_of_discarded_attempts(tmp_path: Path) -> None:
    # Prepare: round 0 merged s-r0-a0; round 1's attempts 0 and 1 were discarded, each naming s-r0-a0
    ledger = Ledger(tmp_path)
    ledger.record(("run", 0, "d", "s-r0-a0"), b"r0", _slice(0), {"a": [0, 1]}, AXES)
    for attempt in (0, 1):
        key = ("run", 1, "d", f"s-r1-a{attempt}")
        ledger.record(key, b"r1", _slice(1 + attempt), {"a": [1, 2]}, AXES, keep_task_id="s-r0-a0")
    # Execute: attempt 2 names it again
    named = Ledger(tmp_path).previous_slice("s-r0-a0")
    # Assert: still there, and only it and the newest slice are kept
    assert named is not None
    np.testing.assert_array_equal(named[1]["l1.weight"][0], [0, 1])
    assert len(list((tmp_path / "replies").iterdir())) == 2
