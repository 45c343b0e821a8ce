"""The generated broker config against a real Mosquitto: TLS only, no anonymous clients, direction-specific ACLs.

Every test starts Mosquitto from `msfusion security init`'s own mosquitto.conf
(in a folder the broker's user can reach) and connects with
`msfusion.wire.transport.MqttTransport`, MQTT 5, so a publish the ACL denies
comes back with reason code 135.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from msfusion.coordinator.fleet.broker import SecureBroker, mosquitto_binary
from msfusion.coordinator.security import Credentials, pki, reload_broker
from msfusion.errors import ConfigError, DeviceLost
from msfusion.wire import topics
from msfusion.wire.transport import MqttTransport, PublishRefused, Received

RUN = "secure"


class Secured:
    """`coordinator/fleet/broker.py`'s secure Mosquitto (certificates and passwords), and clients of it."""

    def __init__(self, log: Path) -> None:
        binary = mosquitto_binary()
        assert binary is not None, "these tests need Mosquitto (apt-get install mosquitto)"
        self.broker = SecureBroker(binary, log, RUN, [], passwords=True)
        self.security = self.broker.security

    def connect(
        self, client_id: str, creds: Credentials | None = None, port: int | None = None, **options: Any
    ) -> MqttTransport:
        port = port or (creds.port if creds is not None else self.security.port)
        opts = {**(creds.transport_options() if creds is not None else {}), **options}
        transport = MqttTransport(client_id, "127.0.0.1", port, protocol="5", reconnect_max_s=1.0, **opts)
        transport.connect(timeout_s=5.0)
        return transport


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secured]:
    made = Secured(tmp_path / "mosquitto.log")
    yield made
    made.broker.stop()


@pytest.fixture
def clients() -> Iterator[Callable[[MqttTransport], MqttTransport]]:
    made: list[MqttTransport] = []
    yield lambda t: made.append(t) or t
    for transport in made:
        transport.close()


def _refused(connect: Callable[[], MqttTransport]) -> str:
    """Connect, expecting a refusal; returns its message."""
    with pytest.raises((ConfigError, DeviceLost)) as info:
        connect().close()
    return str(info.value)


def _received(transport: MqttTransport, timeout_s: float) -> list[Received]:
    out, deadline = [], time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = transport.get(left)
        if isinstance(event, Received):
            out.append(event)
    return out


def test_anonymous_wrong_password_foreign_certificate_and_plain_tcp_clients_are_refused(
    secure: Secured, tmp_path: Path
) -> None:
    # Prepare: a password device; a certificate from a CA the broker never heard of.
    device = secure.security.enroll("dev000", "password")
    reload_broker(secure.broker.pid)  # the broker re-reads its password file and ACL
    time.sleep(0.5)
    ca = pki.create_ca("someone else's CA")
    stranger = pki.issue_client_cert(ca, "dev000")
    (tmp_path / "s.pem").write_bytes(stranger.cert_pem())
    (tmp_path / "s.key").write_bytes(stranger.key_pem())
    tls = {"tls_ca": str(secure.security.ca_cert)}
    # Execute / Assert: each is refused
    password_port = secure.security.password_port
    assert password_port is not None

    def on_password_port(client_id: str, **options: Any) -> MqttTransport:
        return secure.connect(client_id, None, **options, port=password_port)

    anonymous = _refused(lambda: on_password_port("anon", **tls))
    no_cert = _refused(lambda: secure.connect("anon2", None, **tls))
    wrong = _refused(lambda: on_password_port("dev000", username="dev000", password="not it", **tls))
    foreign = _refused(
        lambda: secure.connect("dev000", None, tls_cert=str(tmp_path / "s.pem"), tls_key=str(tmp_path / "s.key"), **tls)
    )
    plain = _refused(lambda: MqttTransport("plain", "127.0.0.1", secure.security.port).connect(timeout_s=3.0))
    assert anonymous and no_cert and wrong and foreign and plain
    # ...while the right password on the password listener gets in.
    secure.connect("dev000", device).close()
    # And a plain TCP socket gets no MQTT from the TLS listener: a TLS handshake is all it can do.
    with socket.create_connection(("127.0.0.1", secure.security.port), timeout=3) as sock:
        context = ssl.create_default_context(cafile=str(secure.security.ca_cert))
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
            assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")


def test_a_device_reads_and_writes_only_its_own_topics_in_the_direction_it_should(
    secure: Secured, clients: Callable[[MqttTransport], MqttTransport]
) -> None:
    # Prepare: two certificate devices and the coordinator.
    dev0 = clients(secure.connect("dev000", secure.security.enroll("dev000")))
    dev1_creds = secure.security.enroll("dev001")
    reload_broker(secure.broker.pid)
    time.sleep(0.5)
    dev1 = clients(secure.connect("dev001", dev1_creds))
    coordinator = clients(secure.connect("coordinator", secure.security.coordinator_credentials()))
    coordinator.subscribe(topics.all_devices(RUN, topics.RESULT))
    dev0.subscribe(topics.task(RUN, "dev001"))  # Mosquitto acks any SUBSCRIBE and checks read access per message
    dev0.subscribe(topics.task(RUN, "dev000"))
    # Execute / Assert: publishing another device's result is refused with reason code 135 ...
    with pytest.raises(PublishRefused) as refused:
        dev0.publish(topics.result(RUN, "dev001"), b"forged")
    assert refused.value.reason_code == 135
    # ... so is publishing to one's own task topic (coordinator -> device only) and another run's tree
    for topic in (topics.task(RUN, "dev000"), topics.result("other-run", "dev000")):
        with pytest.raises(PublishRefused):
            dev0.publish(topic, b"x")
    # ... and another device's task never reaches dev000, while its own does.
    coordinator.publish(topics.task(RUN, "dev001"), b"for dev001")
    coordinator.publish(topics.task(RUN, "dev000"), b"for dev000")
    got = _received(dev0, 1.5)
    assert [(e.topic, e.payload) for e in got] == [(topics.task(RUN, "dev000"), b"for dev000")]
    # The devices' own results reach the coordinator.
    dev0.publish(topics.result(RUN, "dev000"), b"r0")
    dev1.publish(topics.result(RUN, "dev001"), b"r1")
    assert sorted(e.payload for e in _received(coordinator, 1.5)) == [b"r0", b"r1"]


@pytest.mark.parametrize("kind", ["password", "cert"])
def test_a_revoked_device_is_refused_on_reconnect_while_the_others_go_on(
    secure: Secured, clients: Callable[[MqttTransport], MqttTransport], kind: str
) -> None:
    # Prepare: two devices of `kind` connected, the coordinator listening.
    creds = {d: secure.security.enroll(d, kind) for d in ("dev000", "dev001")}  # type: ignore[arg-type]
    reload_broker(secure.broker.pid)
    time.sleep(0.5)
    coordinator = clients(secure.connect("coordinator", secure.security.coordinator_credentials()))
    coordinator.subscribe(topics.all_devices(RUN, topics.RESULT))
    devices = {d: clients(secure.connect(d, c)) for d, c in creds.items()}
    if kind == "cert":  # revoke deletes the key and certificate: keep a copy, as a thief would
        kept = {}
        for name, path in (("tls_cert", creds["dev000"].cert), ("tls_key", creds["dev000"].key)):
            assert path is not None
            kept[name] = path.with_suffix(".stolen")
            kept[name].write_bytes(path.read_bytes())
        creds["dev000"] = replace(creds["dev000"], cert=kept["tls_cert"], key=kept["tls_key"])
    # Execute: revoke dev000 and SIGHUP the running broker.
    secure.security.revoke("dev000")
    reload_broker(secure.broker.pid)
    time.sleep(1.0)
    # Assert: dev000 can no longer publish, and cannot come back; dev001 and the coordinator go on.
    devices["dev001"].publish(topics.result(RUN, "dev001"), b"still here")
    assert [e.payload for e in _received(coordinator, 1.0)] == [b"still here"]
    with pytest.raises((PublishRefused, DeviceLost)):
        devices["dev000"].publish(topics.result(RUN, "dev000"), b"revoked", timeout_s=3.0)
    devices["dev000"].close()
    message = _refused(lambda: secure.connect("dev000-again", creds["dev000"]))
    assert message
    assert "dev000" not in secure.security.devices()
