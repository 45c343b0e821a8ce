"""A device holding the coordinator's public key obeys only signed messages (a real daemon, a real Mosquitto)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import tomllib
from fleet_harness import BUDGET_BYTES, ENGINE, MAX_RATIO, Fleet, coordinator_config, max_abs_diff, merged_rounds

from msfusion.coordinator.fleet.runner import run_coordinator
from msfusion.edge_runtime.config import load_device_config, to_toml
from msfusion.wire import topics
from msfusion.wire.protocol import AxisUnits, BulkRef, RunControl, TaskFailed, TrainTask, Welcome, decode, encode
from msfusion.wire.signing import generate_signing_key
from msfusion.wire.transport import MqttTransport, Received
from msfusion.wire.weights import unpack_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ATOL = 1e-3  # see test_fleet.py


def _with_key(fleet: Fleet, public: Path) -> None:
    """Give every daemon of `fleet` the coordinator's public key."""
    for path in fleet.configs:
        path.write_text(to_toml(replace(load_device_config(path), task_signing_public_key=str(public))))


def test_forged_controls_and_tasks_are_refused_and_signed_ones_obeyed(
    mosquitto: Any, fleet_shards: Any, tmp_path: Path
) -> None:
    # Prepare: one daemon with the coordinator's public key; the test plays coordinator and attacker.
    signer = generate_signing_key(tmp_path / "keys" / "task.key", tmp_path / "keys" / "task.pub")
    run = "signed"
    fleet = Fleet(tmp_path, fleet_shards, run, mosquitto.url)
    _with_key(fleet, tmp_path / "keys" / "task.pub")
    probe = MqttTransport("probe-signed", mosquitto.host, mosquitto.port)
    probe.connect()
    probe.subscribe(topics.result(run, "dev000"))
    ref = BulkRef(transfer_id="x-1", kind="weights", total_bytes=10, sha256="b" * 64, n_chunks=1, chunk_bytes=10)
    forged = TrainTask(
        run_id=run,
        round_idx=0,
        device_id="dev000",
        task_id="evil-r0-a0",
        backend="ort",
        artifact=ref,
        weights=ref,
        units={"conv0": [0]},
        tensor_axes={"conv0.weight": [AxisUnits(axis=0, group="conv0", unit_size=1)]},
        local_epochs=100,  # the schema maximum: refused for its signature, not its size
        batch_size=32,
        lr=0.05,
        max_samples=0,
        mu=0.1,
        tau=0.5,
        contrastive="moon",
        optimizer="sgd",
        seed=1,
        deadline_s=3600.0,
    )
    fleet.start(0)
    try:
        fleet.wait_log(0, "connected to", timeout_s=60)
        # Execute: an unsigned stop, a forged refusal, an unsigned task, a task signed by another key.
        probe.publish(topics.ctl(run, "dev000"), encode(RunControl(run_id=run, device_id="dev000", command="stop")))
        probe.publish(
            topics.ctl(run, "dev000"), encode(Welcome(run_id=run, device_id="dev000", accepted=False, reason="go away"))
        )
        probe.publish(topics.task(run, "dev000"), encode(forged))
        other = generate_signing_key(tmp_path / "keys" / "other.key", tmp_path / "keys" / "other.pub")
        probe.publish(topics.task(run, "dev000"), encode(other.sign(forged)))
        replies = []
        while len(replies) < 2:
            event = probe.get(30)
            assert event is not None, fleet.log(0)
            if isinstance(event, Received):
                replies.append(decode(event.payload))
        alive = fleet.processes["dev000"].poll() is None
        # The coordinator's own signed welcome, then its signed stop of the same session, is obeyed.
        welcome = signer.sign(Welcome(run_id=run, device_id="dev000", accepted=True, session="s1"))
        stop = signer.sign(RunControl(run_id=run, device_id="dev000", command="stop", reason="test over", session="s1"))
        probe.publish(topics.ctl(run, "dev000"), encode(welcome))
        probe.publish(topics.ctl(run, "dev000"), encode(stop))
    finally:
        codes = fleet.stop()  # also when the test fails: no daemon is left behind
        probe.close()
    # Assert: still running after the forgeries, each refused with a reason; the signed stop ends it cleanly.
    assert alive
    assert all(isinstance(r, TaskFailed) and r.code == "bad_signature" for r in replies), replies
    assert "unsigned TrainTask" in replies[0].reason and "does not verify" in replies[1].reason
    log = fleet.log(0)
    assert "dropped a RunControl: unsigned" in log and "dropped a Welcome: unsigned" in log
    assert codes == [0] and "told to stop: test over" in log


def test_a_signed_fleet_trains_what_an_unsigned_one_does(
    mosquitto: Any, fleet_shards: Any, fleet_reference: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: four daemons that demand signatures, a coordinator that signs.
    generate_signing_key(tmp_path / "keys" / "task.key", tmp_path / "keys" / "task.pub")
    fleet = Fleet(tmp_path, fleet_shards, "signed-run", mosquitto.url)
    _with_key(fleet, tmp_path / "keys" / "task.pub")
    fleet.start_all()
    try:
        config = replace(
            coordinator_config(tmp_path, "signed-run", mosquitto.url, fleet_shards),
            task_signing_key=tmp_path / "keys" / "task.key",
        )
        summary = run_coordinator(config, fleet_artifacts)
    finally:
        codes = fleet.stop()
    # Assert: every slice merged, and the model is the reference engine's.
    assert summary.ok, summary.reason
    assert codes == [0, 0, 0, 0]
    lines = merged_rounds(tmp_path)
    assert len(lines) == ENGINE.rounds and all(set(line["replies"].values()) == {"merged"} for line in lines)
    merged = tmp_path / ("model-merged.safetensors" if summary.deployable != "merged" else "model.safetensors")
    assert max_abs_diff(unpack_weights(merged.read_bytes()), fleet_reference[0]) < ATOL


def test_a_secure_simulation_trains_the_reference_model_over_tls_with_acls(
    fleet_shards: Any, fleet_reference: Any, fleet_artifacts: Any, tmp_path: Path
) -> None:
    # Prepare: `msfusion simulate`'s default: throw-away credentials, a private Mosquitto with mutual TLS
    # and the run's ACL, signed tasks, MACed results.
    from msfusion.coordinator.fleet.local_fleet import SimulationConfig, simulate

    config = SimulationConfig(
        engine=ENGINE,
        shards=fleet_shards,
        out=tmp_path / "run",
        memory_budget_bytes=BUDGET_BYTES,
        max_width_ratio=MAX_RATIO,
    )
    # Execute
    summary = simulate(config, fleet_artifacts)
    # Assert: every slice merged, the model is the reference engine's (as an insecure fleet's is), and the
    # devices ran over TLS with keys; the throw-away credentials are gone.
    assert summary.ok, summary.reason
    lines = merged_rounds(tmp_path / "run")
    assert len(lines) == ENGINE.rounds and all(set(line["replies"].values()) == {"merged"} for line in lines)
    out = tmp_path / "run"
    merged = out / ("model-merged.safetensors" if summary.deployable != "merged" else "model.safetensors")
    assert max_abs_diff(unpack_weights(merged.read_bytes()), fleet_reference[0]) < ATOL
    device = tomllib.loads((out / "devices" / "dev000" / "device.toml").read_text())  # its key files are gone
    assert device["broker"].startswith("mqtts://") and device["tls_cert"] and device["result_key"]
    assert device["task_signing_public_key"] and not Path(device["tls_key"]).exists()
    log = (out / "logs" / "broker.log").read_text()
    assert "u'dev000'" in log and "u'coordinator'" in log  # identities from the certificates' CNs
