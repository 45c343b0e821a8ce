"""MqttTransport against a real Mosquitto: QoS 1, persistent sessions, reconnects, last will."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from msfusion.errors import ConfigError, ProtocolError
from msfusion.wire import topics
from msfusion.wire.transport import (
    BrokerUnavailable,
    ConnectionChanged,
    Event,
    MqttTransport,
    Received,
    parse_broker_url,
)

_ids = itertools.count()
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def make_client(request: pytest.FixtureRequest) -> Iterator[object]:
    """`make_client(broker, client_id=None, **kwargs)`: connected transports, closed after the test."""
    clients: list[MqttTransport] = []

    def make(broker: object, client_id: str | None = None, connect: bool = True, **kwargs: object) -> MqttTransport:
        client = MqttTransport(
            client_id or f"{request.node.name[:30]}-{next(_ids)}",
            broker.host,  # type: ignore[attr-defined]
            broker.port,  # type: ignore[attr-defined]
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            **kwargs,  # type: ignore[arg-type]
        )
        clients.append(client)
        if connect:
            client.connect(timeout_s=5)
        return client

    yield make
    for client in clients:
        client.close()


def next_received(client: MqttTransport, timeout_s: float = 5.0) -> Received:
    """The next message, skipping connection events."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = client.get(left)
        if isinstance(event, Received):
            return event
    raise AssertionError(f"no message within {timeout_s} s")


def wait_connection(client: MqttTransport, connected: bool, timeout_s: float = 10.0) -> ConnectionChanged:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = client.get(left)
        if isinstance(event, ConnectionChanged) and event.connected == connected:
            return event
    raise AssertionError(f"no connected={connected} event within {timeout_s} s")


def test_publish_subscribe_round_trip(mosquitto: object, make_client) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    sub = make_client(mosquitto)
    pub = make_client(mosquitto)
    sub.subscribe("msfusion/rt/dev/+/result")
    # Execute
    pub.publish("msfusion/rt/dev/a/result", b"\x00payload\xff")
    pub.publish("msfusion/rt/dev/a/other", b"not subscribed")
    pub.publish("msfusion/rt/dev/b/result", b"second")
    # Assert: in order, only what matches the filter
    assert next_received(sub) == Received("msfusion/rt/dev/a/result", b"\x00payload\xff", False)
    assert next_received(sub) == Received("msfusion/rt/dev/b/result", b"second", False)
    assert sub.get(0.2) is None


def test_put_back_returns_events_first_in_order(mosquitto: object, make_client) -> None:  # type: ignore[no-untyped-def]
    sub = make_client(mosquitto)
    pub = make_client(mosquitto)
    sub.subscribe("msfusion/pb/#")
    pub.publish("msfusion/pb/1", b"1")
    pub.publish("msfusion/pb/2", b"2")
    first = next_received(sub)
    pub.publish("msfusion/pb/3", b"3")
    time.sleep(0.2)
    held: list[Event] = [first, Received("msfusion/pb/x", b"x")]
    sub.put_back(held)
    assert [next_received(sub).payload for _ in range(4)] == [b"1", b"x", b"2", b"3"]


def test_message_sent_while_offline_arrives_after_reconnect(mosquitto: object, make_client) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a subscriber with a persistent session goes away
    sub = make_client(mosquitto, client_id="offline-sub")
    sub.subscribe("msfusion/off/dev/d1/task")
    sub.close()
    pub = make_client(mosquitto)
    # Execute: publish while it is offline, then come back under the same client id
    pub.publish("msfusion/off/dev/d1/task", b"task while offline")
    back = make_client(mosquitto, client_id="offline-sub")
    # Assert: the broker kept the session and queued the message; no subscribe needed
    assert wait_connection(back, True, 1).session_present
    assert next_received(back) == Received("msfusion/off/dev/d1/task", b"task while offline", False)


def test_queued_message_survives_a_broker_restart(private_mosquitto, make_client) -> None:  # type: ignore[no-untyped-def]
    sub = make_client(private_mosquitto, client_id="restart-sub")
    sub.subscribe("msfusion/rs/x")
    sub.close()
    make_client(private_mosquitto).publish("msfusion/rs/x", b"kept")
    private_mosquitto.restart()
    back = make_client(private_mosquitto, client_id="restart-sub")
    assert next_received(back).payload == b"kept"


def test_reconnects_and_resubscribes_after_the_broker_lost_everything(private_mosquitto, make_client) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    sub = make_client(private_mosquitto)
    sub.subscribe("msfusion/rc/+")
    wait_connection(sub, True, 1)
    # Execute: the broker restarts with no memory of our session
    private_mosquitto.restart(forget_sessions=True)
    wait_connection(sub, False)
    assert not wait_connection(sub, True).session_present
    make_client(private_mosquitto).publish("msfusion/rc/a", b"after restart")
    # Assert: the subscription was renewed by the transport
    assert next_received(sub).payload == b"after restart"


def test_publish_while_broker_is_down_goes_out_after_reconnect(private_mosquitto, make_client) -> None:  # type: ignore[no-untyped-def]
    sub = make_client(private_mosquitto, client_id="down-sub")
    sub.subscribe("msfusion/down/x")
    pub = make_client(private_mosquitto)
    private_mosquitto.stop()
    wait_connection(pub, False)
    with pytest.raises(BrokerUnavailable, match="no PUBACK"):
        pub.publish("msfusion/down/x", b"queued in paho", timeout_s=0.3)
    private_mosquitto.start()
    assert next_received(sub, timeout_s=10).payload == b"queued in paho"


def test_last_will_marks_a_killed_client_offline(mosquitto: object, make_client) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a watcher, and a device process with a retained last will
    watcher = make_client(mosquitto)
    watcher.subscribe("msfusion/will/dev/+/status")
    script = (
        "import sys, time\n"
        "from msfusion.wire.transport import MqttTransport\n"
        f"t = MqttTransport('will-dev', '{mosquitto.host}', {mosquitto.port}, keepalive_s=2,\n"  # type: ignore[attr-defined]
        "    will=('msfusion/will/dev/d1/status', b'offline', True))\n"
        "t.connect(5)\n"
        "t.publish('msfusion/will/dev/d1/status', b'idle', retain=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    device = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, env=os.environ.copy())
    try:
        assert device.stdout is not None and device.stdout.readline() == b"ready\n"
        assert next_received(watcher).payload == b"idle"
        # Execute: the device dies without a DISCONNECT
        device.kill()
        device.wait()
    finally:
        if device.poll() is None:
            device.kill()
    # Assert: the broker published the will, and kept it for late subscribers
    assert next_received(watcher).payload == b"offline"
    late = make_client(mosquitto)
    late.subscribe("msfusion/will/dev/d1/status")
    assert next_received(late) == Received("msfusion/will/dev/d1/status", b"offline", True)


def test_errors_are_typed(mosquitto: object, make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client(mosquitto)
    with pytest.raises(ProtocolError, match="cannot publish"):
        client.publish("msfusion/+/x", b"")
    with pytest.raises(ProtocolError, match="cannot subscribe"):
        client.subscribe("msfusion/#/x")
    with pytest.raises(BrokerUnavailable, match="no connection"):
        MqttTransport("nobody", "127.0.0.1", 1).connect(timeout_s=0.5)


def test_refused_credentials_are_a_config_error(mosquitto_factory) -> None:  # type: ignore[no-untyped-def]
    broker = mosquitto_factory("allow_anonymous false\n")
    with pytest.raises(ConfigError, match="Not authorized"):
        MqttTransport("anon", broker.host, broker.port).connect(timeout_s=5)


def test_acl_pattern_confines_a_device_to_its_subtree(mosquitto_factory, make_client) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the ACL from the topics module docstring (usernames, no passwords here)
    acl = "user coordinator\ntopic readwrite msfusion/#\n\npattern readwrite msfusion/+/dev/%u/#\n"
    broker = mosquitto_factory("acl_file {dir}/acl\n", {"acl": acl})
    coordinator = make_client(broker, username="coordinator")
    d1 = make_client(broker, username="d1")
    coordinator.subscribe(topics.all_devices("r", topics.RESULT))
    d1.subscribe(topics.task("r", "d1"))
    # Execute / Assert: a device reaches its own subtree only
    with contextlib.suppress(ConfigError):  # Mosquitto 2.0 grants it over v3.1.1, then delivers nothing
        d1.subscribe(topics.task("r", "d2"))
    d1.publish(topics.result("r", "d2"), b"forged")  # acked, but dropped by the broker
    d1.publish(topics.result("r", "d1"), b"own")
    coordinator.publish(topics.task("r", "d2"), b"task for d2")
    coordinator.publish(topics.task("r", "d1"), b"task for d1")
    assert next_received(coordinator) == Received(topics.result("r", "d1"), b"own", False)
    assert next_received(d1) == Received(topics.task("r", "d1"), b"task for d1", False)
    assert coordinator.get(0.3) is None and d1.get(0.1) is None


def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://broker.local:1884") == ("broker.local", 1884)
    assert parse_broker_url("mqtt://10.0.0.2") == ("10.0.0.2", 1883)
    assert parse_broker_url("localhost:1999") == ("localhost", 1999)
    for bad in ("http://x:1", "mqtt://:1883", "mqtt://x:notaport", "mqtt://x:1883/path"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_an_mqtt5_session_expires_after_its_interval(mosquitto: object, make_client) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two MQTT 5 subscribers go away, one with a 1 s session expiry, one with the default (a day)
    short = make_client(mosquitto, client_id="expiry-short", protocol="5", session_expiry_s=1)
    kept = make_client(mosquitto, client_id="expiry-kept", protocol="5")
    for client in (short, kept):
        client.subscribe("msfusion/exp/dev/d1/task")
        client.close()
    make_client(mosquitto).publish("msfusion/exp/dev/d1/task", b"queued")
    # Execute: both come back after the short interval passed
    time.sleep(2.5)
    short_back = make_client(mosquitto, client_id="expiry-short", protocol="5", session_expiry_s=1)
    kept_back = make_client(mosquitto, client_id="expiry-kept", protocol="5")
    # Assert: the broker forgot the expired session (and what it queued), and kept the other
    assert not wait_connection(short_back, True, 1).session_present
    assert wait_connection(kept_back, True, 1).session_present
    assert next_received(kept_back).payload == b"queued"


def test_the_session_expiry_is_bounded() -> None:
    with pytest.raises(ConfigError, match="session_expiry_s"):
        MqttTransport("x", "127.0.0.1", session_expiry_s=-1)
