"""The private broker `simulate` starts: Mosquitto when installed, amqtt otherwise, on 127.0.0.1 only."""

from __future__ import annotations

from pathlib import Path

import pytest

from msfusion.coordinator.fleet.broker import HOST, start_private_broker
from msfusion.wire.transport import MqttTransport, Received, parse_broker_url


@pytest.mark.parametrize("prefer", ["mosquitto", pytest.param("amqtt", marks=pytest.mark.slow)])
def test_a_private_broker_carries_messages_on_localhost(prefer: str, tmp_path: Path) -> None:
    # Prepare
    broker = start_private_broker(tmp_path / "broker.log", prefer=prefer)
    host, port = parse_broker_url(broker.url)
    client = MqttTransport(f"probe-{prefer}", host, port)
    try:
        # Execute
        client.connect()
        client.subscribe("msfusion/test")
        client.publish("msfusion/test", b"hello")
        event = client.get(5)
        while event is not None and not isinstance(event, Received):
            event = client.get(5)
    finally:
        client.close()
        broker.stop()
    # Assert
    assert host == HOST == "127.0.0.1"
    assert isinstance(event, Received) and event.payload == b"hello"
