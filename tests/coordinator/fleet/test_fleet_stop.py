"""Stopping real runs.

`msfusion runs stop` stops a run after its current round; `--resume` then ends where an uninterrupted
run ends. SIGTERM to `msfusion simulate` stops its device daemons and its broker, as a normal end does.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from fleet_harness import (
    CoordinatorThread,
    Fleet,
    coordinator_config,
    max_abs_diff,
    merged_rounds,
    python,
    wait_for,
)
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


def _online(out: Path) -> int:
    """How many devices the run's latest fleet snapshot shows online."""
    snapshots = [e for e in read_events(out) if e["kind"] == "fleet"]
    return sum(d["online"] for d in snapshots[-1]["devices"].values()) if snapshots else 0


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running (the same processes: psutil checks their start time, not only the pid)."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_sigterm_to_simulate_stops_its_device_daemons_and_broker(tmp_path: Path) -> None:
    # Prepare: `msfusion simulate` with 2 device daemons and its private (TLS) Mosquitto, many rounds.
    out = tmp_path / "run"
    command = [python(), "-m", "msfusion.coordinator.cli.main", "simulate", "--devices", "2", "--rounds", "50"]
    command += ["--local-samples", "64", "--samples-per-device", "300", "--channels", "8,16,32"]
    command += ["--out", str(out), "--dashboard", "off"]
    with open(tmp_path / "simulate.log", "wb") as log:
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    broker_conf: Path | None = None
    try:
        wait_for(lambda: run.poll() is not None or _online(out) == 2, 120, "both devices registered")
        assert run.poll() is None, (tmp_path / "simulate.log").read_text()[-2000:]
        children = psutil.Process(run.pid).children(recursive=True)
        daemons = [p for p in children if "msfusion.edge_runtime" in p.cmdline()]
        brokers = [p for p in children if p.name() == "mosquitto"]
        assert len(daemons) == 2 and len(brokers) == 1, [p.cmdline() for p in children]
        broker_conf = Path(brokers[0].cmdline()[-1])  # in the run's throw-away credentials folder
        # Execute: what `kill`, a service manager or `timeout` sends.
        run.send_signal(signal.SIGTERM)
        code = run.wait(60)
        # Assert: it exited as interrupted, and neither a daemon nor the broker outlived it.
        deadline = time.monotonic() + 5
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(children), [(p.pid, p.cmdline()) for p in _alive(children)]
        assert code == 130, (tmp_path / "simulate.log").read_text()[-2000:]
        assert "device exit codes:" in (out / "logs" / "coordinator.log").read_text()
        assert not broker_conf.exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for proc in _alive(children):
            proc.kill()
        if broker_conf is not None:  # <folder>/security/mosquitto.conf: what a broker left behind holds keys
            shutil.rmtree(broker_conf.parents[1], ignore_errors=True)
