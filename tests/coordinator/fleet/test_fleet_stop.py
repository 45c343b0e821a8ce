"""`msfusion runs stop` stops a real run after its current round; `--resume` then ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleet_harness import CoordinatorThread, Fleet, coordinator_config, max_abs_diff, merged_rounds, wait_for
from typer.testing import CliRunner

from msfusion.coordinator.cli.main import ExitCode, app, run_exit_code
from msfusion.coordinator.fleet.checkpoint import load_checkpoint
from msfusion.coordinator.fleet.events import read_events, run_state
from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.wire.weights import unpack_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATOL = 1e-3  # see test_fleet.py


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(
    mosquitto: Any, fleet_shards: Any, fleet_reference: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: a 3-round run over 4 device daemons.
    config = coordinator_config(tmp_path, "stop", mosquitto.url, fleet_shards)
    fleet = Fleet(tmp_path, fleet_shards, "stop", mosquitto.url)
    fleet.start_all()
    try:
        coordinator = CoordinatorThread(config, fleet_artifacts)
        coordinator.start()
        wait_for(lambda: len(merged_rounds(tmp_path)) >= 1, 150, "a merged round")
        # Execute: stop it from the command line, as an operator would.
        stopped = CliRunner().invoke(app, ["runs", "stop", str(tmp_path), "--timeout-s", "150"])
        first = coordinator.result(150)
    finally:
        codes = fleet.stop()
    # Assert: it stopped after a whole round, told its devices, and says how to go on.
    assert stopped.exit_code == 0, stopped.output
    assert first.state == "stopped" and not first.ok and run_exit_code(first) == ExitCode.INTERRUPTED
    assert codes == [0, 0, 0, 0]
    done = len(merged_rounds(tmp_path))
    assert 1 <= done < 3 and load_checkpoint(tmp_path / "checkpoint")[1].next_round == done
    assert run_state(tmp_path) == "stopped" and not (tmp_path / "STOP").exists()
    # Resume with the devices back (their ledgers hold the last merged round's slices).
    fleet = Fleet(tmp_path, fleet_shards, "stop", mosquitto.url)
    fleet.start_all()
    try:
        second = run_coordinator(config, fleet_artifacts, resume=True)
    finally:
        fleet.stop()
    assert second.ok and second.state == "finished", second.reason
    lines = merged_rounds(tmp_path)
    assert [line["round_idx"] for line in lines] == [0, 1, 2]
    assert all(b["start_sha256"] == a["end_sha256"] for a, b in zip(lines, lines[1:]))
    final = unpack_weights(
        (tmp_path / ("model-merged.safetensors" if second.deployable != "merged" else "model.safetensors")).read_bytes()
    )
    assert max_abs_diff(final, fleet_reference[0]) < ATOL
    kinds = [e["kind"] for e in read_events(tmp_path) if e["kind"] in ("run_started", "run_finished")]
    assert kinds == ["run_started", "run_finished", "run_started", "run_finished"]
    assert run_state(tmp_path) == "finished"
