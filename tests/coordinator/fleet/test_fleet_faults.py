"""Faults over a real Mosquitto with real device processes: a killed device, a restarted broker,
a killed and resumed coordinator, malformed tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleet_harness import (
    ENGINE,
    N_DEVICES,
    CoordinatorThread,
    Fleet,
    coordinator_config,
    max_abs_diff,
    merged_rounds,
    wait_for,
)

from msfusion.coordinator.fleet.checkpoint import load_checkpoint, weights_digest
from msfusion.coordinator.fleet.report import read_metrics
from msfusion.wire import topics
from msfusion.wire.protocol import RunControl, TaskFailed, decode, encode
from msfusion.wire.transport import MqttTransport, Received
from msfusion.wire.weights import unpack_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATOL = 1e-3  # see test_fleet.py
DEVICES = [f"dev{i:03d}" for i in range(N_DEVICES)]


def test_a_killed_device_is_left_out_at_the_deadline_and_rejoins_later(
    mosquitto: Any, fleet_shards: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare
    fleet = Fleet(tmp_path, fleet_shards, "killdev", mosquitto.url)
    fleet.start_all()
    config = coordinator_config(tmp_path, "killdev", mosquitto.url, fleet_shards, deadline_s=8.0)
    coordinator = CoordinatorThread(config, fleet_artifacts)
    coordinator.start()
    try:
        # Execute: kill dev002 as soon as it takes round 1's task; restart it once round 1 closed.
        fleet.wait_log(2, "round 1: task", timeout_s=120)
        fleet.kill(2)
        wait_for(lambda: len(merged_rounds(tmp_path)) >= 2, 60, "round 1 to close")
        fleet.start(2)
        summary = coordinator.result()
    finally:
        fleet.stop()
    # Assert: round 1 closed at its deadline with the three survivors; dev002 is back in round 2.
    lines = read_metrics(tmp_path)
    assert summary.ok, summary.reason
    assert [line["round_idx"] for line in lines] == [0, 1, 2]
    assert lines[1]["replies"]["dev002"] == "no reply"
    assert [d for d, r in lines[1]["replies"].items() if r == "merged"] == ["dev000", "dev001", "dev003"]
    assert lines[1]["timings_s"]["collect_s"] >= 8.0 - 0.5
    assert lines[2]["replies"] == {d: "merged" for d in DEVICES}
    assert any("dev002" in f and "no reply" in f for f in summary.failures)


def test_a_broker_restart_mid_round_loses_no_slice_and_merges_none_twice(
    private_mosquitto: Any, fleet_shards: Any, fleet_reference: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare
    url = private_mosquitto.url
    fleet = Fleet(tmp_path, fleet_shards, "brokerrestart", url)
    fleet.start_all()
    coordinator = CoordinatorThread(coordinator_config(tmp_path, "brokerrestart", url, fleet_shards), fleet_artifacts)
    coordinator.start()
    try:
        # Execute: restart the broker while round 1 is under way.
        fleet.wait_log(1, "round 1: task", timeout_s=120)
        private_mosquitto.restart()
        summary = coordinator.result()
    finally:
        fleet.stop()
    # Assert: one attempt per round, each merging all four slices exactly once; the model is the reference's.
    lines = read_metrics(tmp_path)
    assert summary.ok, summary.reason
    assert [(line["round_idx"], line["attempt"]) for line in lines] == [(0, 0), (1, 0), (2, 0)]
    for line in lines:
        assert line["replies"] == {d: "merged" for d in DEVICES}, line["replies"]
    final = unpack_weights((tmp_path / "model.safetensors").read_bytes())
    assert max_abs_diff(final, fleet_reference[0]) < ATOL


def _run_toml(out: Path, url: str, shards: Any, cache: Path) -> str:
    return f"""
run_id = "resume"
broker = "{url}"
out = "{out}"
eval_shard = "{shards.test}"
backend = "ort"
artifact_cache = "{cache}"
[engine]
rounds = {ENGINE.rounds}
seed = {ENGINE.seed}
[engine.model]
arch = "cnn"
channels = {list(ENGINE.model.channels)}
[engine.local]
epochs = {ENGINE.local.epochs}
batch_size = {ENGINE.local.batch_size}
lr = {ENGINE.local.lr}
max_samples = {ENGINE.local.max_samples}
[engine.local.optimizer]
momentum = {ENGINE.local.optimizer.momentum}
[engine.loss]
variant = "{ENGINE.loss.variant.value}"
mu = {ENGINE.loss.mu}
tau = {ENGINE.loss.tau}
[round]
deadline_s = 60
stall_s = 2
[fleet]
min_devices = {N_DEVICES}
wait_s = 90
heartbeat_timeout_s = 10
"""


def test_a_killed_coordinator_resumes_from_its_checkpoint_bit_for_bit(
    mosquitto: Any, fleet_shards: Any, fleet_reference: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: the coordinator as its own process, through the CLI.
    fleet = Fleet(tmp_path, fleet_shards, "resume", mosquitto.url)
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(_run_toml(tmp_path, mosquitto.url, fleet_shards, fleet_artifacts.cache_dir))
    command = [
        sys.executable,
        "-m",
        "msfusion.coordinator.cli.main",
        "coordinator",
        "run",
        "--config",
        str(run_toml),
        "--quiet",
    ]
    fleet.start_all()
    try:
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: len(merged_rounds(tmp_path)) >= 2 or first.poll() is not None, 150, "two merged rounds")
        first.kill()
        first.wait()
        weights, state = load_checkpoint(tmp_path / "checkpoint")
        assert state.next_round == 2
        # Execute
        second = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=150)
    finally:
        fleet.stop()
    # Assert: round 2 starts from the checkpoint's weights, bit for bit, and the run ends like the reference.
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = merged_rounds(tmp_path)
    assert [line["round_idx"] for line in lines] == [0, 1, 2]
    assert lines[2]["start_sha256"] == weights_digest(weights) == lines[1]["end_sha256"]
    assert lines[2]["replies"] == {d: "merged" for d in DEVICES}
    final = unpack_weights((tmp_path / "model.safetensors").read_bytes())
    assert max_abs_diff(final, fleet_reference[0]) < ATOL


def test_a_malformed_task_gets_a_task_failed_reply_and_the_daemon_keeps_serving(
    mosquitto: Any, fleet_shards: Any, tmp_path: Path
) -> None:
    # Prepare: one device, and the test in the coordinator's seat.
    fleet = Fleet(tmp_path, fleet_shards, "malformed", mosquitto.url)
    probe = MqttTransport("probe-malformed", mosquitto.host, mosquitto.port)
    probe.connect()
    probe.subscribe(topics.result("malformed", "dev000"))
    fleet.start(0)
    fleet.wait_log(0, "connected to", timeout_s=60)
    task_topic = topics.task("malformed", "dev000")
    replies: list[TaskFailed] = []

    def next_reply() -> TaskFailed:
        while True:
            event = probe.get(30)
            assert event is not None, fleet.log(0)
            if isinstance(event, Received):
                msg = decode(event.payload)
                assert isinstance(msg, TaskFailed)
                replies.append(msg)
                return msg

    try:
        # Execute: bytes that are not MessagePack, then a task missing most of its fields.
        probe.publish(task_topic, b"\xc1 not a message")
        first = next_reply()
        probe.publish(
            task_topic,
            msgspec.msgpack.encode(
                {"type": "task", "schema_version": 1, "run_id": "malformed", "round_idx": 4, "task_id": "t-4"}
            ),
        )
        second = next_reply()
        stop = RunControl(run_id="malformed", device_id="dev000", command="stop", reason="test over")
        probe.publish(topics.ctl("malformed", "dev000"), encode(stop))
        codes = fleet.stop()
    finally:
        probe.close()
    # Assert
    assert (first.code, first.task_id) == ("protocol", "malformed")
    assert (second.code, second.task_id, second.round_idx) == ("protocol", "t-4", 4)
    assert "invalid 'task' message" in second.reason
    assert codes == [0]


def test_a_redelivered_task_gets_the_same_reply_without_training_again(
    mosquitto: Any, fleet_shards: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: one device; the test runs a round itself and listens to the device's task and result topics.
    from msfusion.coordinator.fleet.config import RoundConfig
    from msfusion.coordinator.fleet.link import CoordinatorLink
    from msfusion.coordinator.fleet.registry import Fleet as FleetState
    from msfusion.coordinator.fleet.rounds import RoundContext, run_round
    from msfusion.coordinator.fleet.runner import (
        initial_state,
        load_eval_data,
        wait_for_devices,
    )
    from msfusion.models.registry import model_spec

    run = "redeliver"
    fleet = Fleet(tmp_path, fleet_shards, run, mosquitto.url)
    probe = MqttTransport("probe-redeliver", mosquitto.host, mosquitto.port)
    probe.connect()
    probe.subscribe(topics.task(run, "dev000"))
    probe.subscribe(topics.result(run, "dev000"))
    coordinator = MqttTransport("coordinator-redeliver", mosquitto.host, mosquitto.port)
    coordinator.connect()
    link = CoordinatorLink(coordinator, run, stall_s=2.0)
    link.subscribe()
    spec = model_spec(ENGINE.model)
    config = coordinator_config(tmp_path, run, mosquitto.url, fleet_shards)
    ctx = RoundContext(
        run_id=run,
        backend="ort",
        engine=ENGINE,
        round=RoundConfig(deadline_s=60),
        spec=spec,
        fleet=FleetState(spec, run, "ort", 30.0),
        link=link,
        artifacts=fleet_artifacts,
        test=load_eval_data(fleet_shards.test, ENGINE.model),
        checkpoint_dir=tmp_path / "checkpoint",
    )
    fleet.start(0)

    def next_on(suffix: str) -> bytes:
        while True:
            event = probe.get(30)
            assert event is not None, fleet.log(0)
            if isinstance(event, Received) and event.topic.endswith(suffix):
                return event.payload

    try:
        wait_for_devices(ctx, 1, 60, None)
        weights, state = initial_state(config, resume=False)
        outcome, _, _ = run_round(ctx, weights, state, attempt=0)
        task_bytes = next_on("/task")
        first = next_on("/result")
        # Execute: the broker delivers the same task again.
        probe.publish(topics.task(run, "dev000"), task_bytes)
        second = next_on("/result")
        probe.publish(topics.ctl(run, "dev000"), encode(RunControl(run_id=run, device_id="dev000", command="stop")))
        codes = fleet.stop()
    finally:
        probe.close()
        coordinator.close()
    # Assert: one training, two identical replies.
    assert outcome.replies == {"dev000": "merged"}
    assert second == first
    log = fleet.log(0)
    assert log.count("round 0: task") == 1 and log.count("was redelivered") == 1
    assert codes == [0]
