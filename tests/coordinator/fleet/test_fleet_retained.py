"""Nothing of a run stays retained on the broker once it is over (a real Mosquitto).

Devices retain their registration and status; the broker would keep them for
ever. At the end of a run the coordinator deletes those of every device it saw
(`CoordinatorLink.clear_retained`), and a daemon told to stop deletes its own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_harness import retained

from msfusion.coordinator.fleet.link import CoordinatorLink
from msfusion.edge_runtime.config import DeviceConfig
from msfusion.edge_runtime.daemon import Daemon, ExitCode, offline_beat
from msfusion.wire import topics
from msfusion.wire.protocol import Capacity, Registration, RunControl, decode, encode
from msfusion.wire.transport import ConnectionChanged, MqttTransport

pytestmark = pytest.mark.e2e


def _registration(run_id: str, device_id: str) -> bytes:
    cap = Capacity(memory_budget_bytes=1 << 30, cores=1, arch="x86_64", backends=["ort"])
    return encode(Registration(run_id=run_id, device_id=device_id, capacity=cap, runtime_version="test"))


def test_the_coordinator_clears_what_devices_left_retained(mosquitto: Any) -> None:
    # Prepare: two devices retained their registration and status; one of them died (its offline will)
    run = "retained-link"
    coordinator = MqttTransport("coord-retained-link", mosquitto.host, mosquitto.port)
    coordinator.connect()
    link = CoordinatorLink(coordinator, run)
    link.subscribe()
    device = MqttTransport("dev-retained-link", mosquitto.host, mosquitto.port)
    device.connect()
    for device_id in ("dev000", "dev001"):
        device.publish(topics.register(run, device_id), _registration(run, device_id), retain=True)
        device.publish(topics.status(run, device_id), offline_beat(run, device_id), retain=True)
    device.close()
    assert len(retained(mosquitto, run)) == 4
    assert len(_events(link)) == 4
    # Execute
    try:
        cleared = link.clear_retained()
        after = _events(link)
    finally:
        coordinator.close()
    # Assert: nothing of the run is left; a deleted message is no event for a coordinator still listening
    assert cleared == 4
    assert retained(mosquitto, run) == {}
    assert after == []


def _events(link: CoordinatorLink) -> list[Any]:
    """What the link reports until it is quiet for half a second (connection changes left out)."""
    events = []
    while (event := link.poll(0.5)) is not None:
        if not isinstance(event, ConnectionChanged):
            events.append(event)
    return events


def _daemon(broker: Any, tmp_path: Path, run: str) -> tuple[Daemon, threading.Thread, list[ExitCode]]:
    config = DeviceConfig(
        device_id="dev000",
        run_id=run,
        broker=broker.url,
        data_dir=tmp_path / "no-shard",
        state_dir=tmp_path / "state",
        memory_budget_bytes=1 << 30,
        heartbeat_s=0.1,
    )
    daemon = Daemon(config)
    codes: list[ExitCode] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    thread.start()
    return daemon, thread, codes


def _wait_registered(broker: Any, run: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kept = retained(broker, run, 0.3)
        if topics.register(run, "dev000") in kept and topics.status(run, "dev000") in kept:
            return
    raise AssertionError(f"the daemon never registered: {kept}")


def test_a_daemon_told_to_stop_deletes_its_retained_messages(mosquitto: Any, tmp_path: Path) -> None:
    # Prepare: a daemon that registered (retained) and beats (retained)
    run = "retained-daemon"
    daemon, thread, codes = _daemon(mosquitto, tmp_path, run)
    _wait_registered(mosquitto, run)
    # Execute: the coordinator says the run is over
    coordinator = MqttTransport("coord-retained-daemon", mosquitto.host, mosquitto.port)
    coordinator.connect()
    stop = RunControl(run_id=run, device_id="dev000", command="stop", reason="run finished")
    coordinator.publish(topics.ctl(run, "dev000"), encode(stop))
    coordinator.close()
    thread.join(20)
    # Assert
    assert codes == [ExitCode.STOPPED]
    assert retained(mosquitto, run) == {}


def test_a_daemon_stopped_otherwise_leaves_its_offline_status(mosquitto: Any, tmp_path: Path) -> None:
    # Prepare
    run = "retained-sigterm"
    daemon, thread, codes = _daemon(mosquitto, tmp_path, run)
    _wait_registered(mosquitto, run)
    # Execute: stopped as by SIGTERM: the run goes on without it
    daemon.stop()
    thread.join(20)
    # Assert: the coordinator still learns that it is gone
    kept = retained(mosquitto, run)
    assert codes == [ExitCode.STOPPED]
    status = decode(kept[topics.status(run, "dev000")])
    assert getattr(status, "state", None) == "offline"
