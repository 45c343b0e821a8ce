"""The MQTT transport adapter: the only module that imports paho.

`MqttTransport` speaks MQTT v3.1.1 (or, with ``protocol="5"``, MQTT 5) with a
persistent session (``clean_session=False`` and a stable client id; under MQTT 5
``clean_start=False``): the broker keeps the client's subscriptions and queues
QoS 1 messages while it is offline, and delivers them when the same client id
connects again. Every publish and subscription is QoS 1, so a message may
arrive twice; receivers handle messages idempotently (see `protocol.TrainTask.key`).

Session expiry: under MQTT 5 a session ends `session_expiry_s` after its client
disconnected (a day by default), so the broker forgets the sessions of clients
that are gone for good. MQTT v3.1.1 has no session expiry: a persistent session
lives until the same client id connects with a clean session. The broker can
still expire them: Mosquitto's ``persistent_client_expiration`` (e.g. ``1d``)
drops the sessions of clients that have not connected for that long. A client
whose session expired loses only what was queued for it: it subscribes again
on every connect, and the coordinator sends a task again to a device that
comes back.

TLS: ``mqtts://host:port`` URLs (`parse_broker`) and the `tls_ca`, `tls_cert`,
`tls_key` options: the broker's certificate is verified against `tls_ca` (the
system's CAs when None) and its host name, TLS 1.2 at least; `tls_cert` and
`tls_key` are this client's certificate for brokers that require one
(``msfusion security`` makes all of them). Under MQTT 5 a publish the broker's
ACL denies is reported: `wait_published` raises `PublishRefused` (reason code
135, "Not authorized"); under v3.1.1 the broker acks it and drops it silently.

Threading: paho's network thread (``loop_start``) runs the callbacks, which
only put events on `MqttTransport.events` (or note an ack) and return. The
caller's thread does all the work, reading events with `get`.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import ssl
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Literal, NamedTuple, Protocol, Union
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from msfusion.errors import ConfigError, DeviceLost, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 session expiry interval: what v3.1.1's clean_session=False means
DEFAULT_SESSION_EXPIRY_S = 24 * 3600  # MQTT 5: a session outlives its client's disconnect by a day
MqttProtocol = Literal["3.1.1", "5"]
_PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}
_REFUSED_AS_CONFIG = {"Bad user name or password", "Not authorized", "Client identifier not valid"}


class BrokerUnavailable(DeviceLost):
    """This side cannot reach the broker (not connected, or an ack did not come in time)."""


class PublishRefused(ConfigError):
    """The broker acked a publish with a failure reason (MQTT 5 only), e.g. 135 "Not authorized" (ACL).

    Attributes:
        reason_code: the PUBACK's reason code (135: not authorized).
        reason: its name.
    """

    def __init__(self, message: str, reason_code: int, reason: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.reason = reason


@dataclass(frozen=True)
class Received:
    """A message that arrived on a subscribed topic."""

    topic: str
    payload: bytes
    retained: bool = False


@dataclass(frozen=True)
class ConnectionChanged:
    """The connection to the broker came up or went down."""

    connected: bool
    reason: str
    session_present: bool = False


Event = Union[Received, ConnectionChanged]


class Transport(Protocol):
    """What the fleet needs from a message bus."""

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout_s: float = 10.0) -> None: ...

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> Any: ...

    def wait_published(self, info: Any, timeout_s: float) -> None: ...

    def subscribe(self, topic_filter: str, timeout_s: float = 10.0) -> None: ...

    def get(self, timeout_s: float | None = None) -> Event | None: ...

    def put_back(self, events: Iterable[Event]) -> None: ...

    def close(self) -> None: ...


class BrokerAddress(NamedTuple):
    """A parsed broker URL: `scheme` is "mqtt" (plain TCP) or "mqtts" (TLS)."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"


def parse_broker(url: str) -> BrokerAddress:
    """Split ``mqtt://host:port``, ``mqtts://host:port`` (TLS), ``host:port`` or ``host``.

    The default port is 1883 for mqtt:// and 8883 for mqtts://; ``tcp://`` means
    mqtt://, ``ssl://`` and ``tls://`` mean mqtts://.

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    try:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    except ValueError as exc:  # an unclosed or invalid [IPv6] host
        raise ConfigError(f"broker URL {url!r}: {exc}") from exc
    schemes = {"mqtt": "mqtt", "tcp": "mqtt", "mqtts": "mqtts", "ssl": "mqtts", "tls": "mqtts"}
    scheme = schemes.get(parts.scheme)
    if scheme is None:
        raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts:// (TLS)")
    try:
        port = parts.port or (DEFAULT_TLS_PORT if scheme == "mqtts" else DEFAULT_PORT)
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {exc}") from exc
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"broker URL for {parts.hostname}: credentials do not go in the URL (it is logged); "
            "use username/password or a client certificate"
        )
    if not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"broker URL {url!r}: expected {scheme}://host:port")
    return BrokerAddress(scheme, parts.hostname, port)


def is_loopback(host: str) -> bool:
    """Whether a broker host is this machine (``localhost``, 127.0.0.0/8, ::1): plain TCP never leaves it."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_broker_url(url: str) -> tuple[str, int]:
    """Split ``mqtt://host:port`` (or ``mqtts://``, ``host:port``, ``host``) into host and port.

    Use `parse_broker` to learn whether the URL asks for TLS.

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    address = parse_broker(url)
    return address.host, address.port


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client TLS context: the broker verified against `ca` (system CAs when None) and its host name, TLS >= 1.2.

    Args:
        ca: PEM file of the CA(s) that signed the broker's certificate.
        cert, key: this client's certificate and key (PEM) for a broker that requires one;
            `key` may be omitted when `cert` holds both.

    Raises:
        ConfigError: a file is missing or unreadable, or the key does not match the certificate.
    """
    if key is not None and cert is None:
        raise ConfigError("a TLS client key needs its certificate (tls_cert)")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:  # ssl.SSLError is an OSError; listed for the reader
        raise ConfigError(f"cannot set up TLS (ca {ca}, cert {cert}, key {key}): {exc}") from exc
    return context


class MqttTransport:
    """A paho client with QoS 1, a persistent session, acks awaited with timeouts.

    Args:
        client_id: stable across restarts, so the broker keeps this client's session.
        host, port: the broker.
        username, password: broker credentials (a device logs in as its device id).
        will: ``(topic, payload, retain)`` the broker publishes if this client vanishes.
        keepalive_s: MQTT keepalive; the will fires about 1.5x this after a silent death.
        reconnect_min_s, reconnect_max_s: backoff between reconnect attempts.
        tls: connect over TLS (implied by any of `tls_ca`, `tls_cert`, `tls_key`).
        tls_ca: PEM file of the CA that signed the broker's certificate (None: the system's CAs).
        tls_cert, tls_key: this client's certificate and key (PEM), for brokers that require one.
        protocol: "3.1.1" (the default) or "5"; under MQTT 5 a refused publish raises `PublishRefused`.
        session_expiry_s: MQTT 5 only: seconds the broker keeps this client's session after it
            disconnects (`SESSION_NEVER_EXPIRES`: for ever). MQTT v3.1.1 has no such interval (see above).

    Raises:
        ConfigError: an unknown protocol, or TLS files that cannot be loaded.
    """

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes, bool] | None = None,
        keepalive_s: int = 30,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        protocol: MqttProtocol = "3.1.1",
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        max_inflight: int = 20,
    ) -> None:
        if protocol not in _PROTOCOLS:
            raise ConfigError(f"MQTT protocol must be one of {sorted(_PROTOCOLS)}, got {protocol!r}")
        if not 0 <= session_expiry_s <= SESSION_NEVER_EXPIRES:
            raise ConfigError(f"session_expiry_s must be in 0..{SESSION_NEVER_EXPIRES}, got {session_expiry_s}")
        self.session_expiry_s = session_expiry_s
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive_s = keepalive_s
        self.protocol = protocol
        self.tls = tls or tls_ca is not None or tls_cert is not None or tls_key is not None
        self.events: queue.Queue[Event] = queue.Queue()
        self._held: deque[Event] = deque()  # put back by the consumer; read before `events`
        self._filters: list[str] = []
        self._lock = threading.Lock()
        self._acks = threading.Condition()
        self._subacks: OrderedDict[int, list[Any]] = OrderedDict()
        self._refused_pubs: OrderedDict[int, Any] = OrderedDict()  # mid -> failure reason code (MQTT 5)
        self._ignored_subacks: set[int] = set()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._started = False

        if protocol == "5":  # paho refuses clean_session under MQTT 5: clean_start goes with connect
            self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=_PROTOCOLS[protocol])
        else:
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=False,
                protocol=MQTTProtocolVersion.MQTTv311,
            )
        if self.tls:
            self._client.tls_set_context(tls_context(tls_ca, tls_cert, tls_key))
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(max_inflight)  # QoS 1 publishes sent before their PUBACKs
        self._client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            topic, payload, retain = will
            self._client.will_set(topic, payload, qos=1, retain=retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    @classmethod
    def from_url(cls, client_id: str, url: str, **options: Any) -> MqttTransport:
        """A transport for a broker URL: ``mqtts://`` turns TLS on; `options` are the constructor's keywords.

        Raises:
            ConfigError: a bad URL or option.
        """
        address = parse_broker(url)
        if address.tls:
            options.setdefault("tls", True)
        return cls(client_id, address.host, address.port, **options)

    # paho callbacks (network thread): note the event and return.

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self.events.put(ConnectionChanged(False, f"refused: {reason}"))
            return
        self._refused = None
        with self._lock:
            filters = list(self._filters)
        if filters:
            # Resubscribing is one non-blocking packet; it covers a broker that lost
            # our session. Nobody waits for its SUBACK.
            rc, mid = client.subscribe([(f, 1) for f in filters])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._acks:
                    self._ignored_subacks.add(mid)
        self._connected.set()
        self.events.put(ConnectionChanged(True, str(reason), bool(flags.session_present)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        self.events.put(ConnectionChanged(False, str(reason)))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.events.put(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # Runs before paho marks the message published, so `wait_published` sees the refusal.
        with self._acks:
            if reason.is_failure:
                self._refused_pubs[mid] = reason
                while len(self._refused_pubs) > 1000:  # refusals nobody waited for
                    self._refused_pubs.popitem(last=False)
            else:
                self._refused_pubs.pop(mid, None)  # a stale refusal of an earlier message with this mid

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._acks:
            if mid in self._ignored_subacks:
                self._ignored_subacks.discard(mid)
                return
            self._subacks[mid] = list(reasons)
            while len(self._subacks) > 1000:  # acks nobody waited for (timed out)
                self._subacks.popitem(last=False)
            self._acks.notify_all()

    # Our side.

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and start the network thread; it reconnects with backoff from then on.

        Raises:
            ConfigError: the broker refused the credentials or client id.
            BrokerUnavailable: no connection within `timeout_s`.
        """
        if not self._started:
            if self.protocol == "5":
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.session_expiry_s
                self._client.connect_async(
                    self.host, self.port, keepalive=self.keepalive_s, clean_start=False, properties=properties
                )
            else:
                self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
            self._client.loop_start()
            self._started = True
        deadline = time.monotonic() + timeout_s
        while not self._connected.wait(0.05):
            refused = self._refused
            if refused is not None and refused in _REFUSED_AS_CONFIG:
                self.close()
                raise ConfigError(f"broker {self.host}:{self.port} refused {self.client_id!r}: {refused}")
            if time.monotonic() > deadline:
                self.close()
                raise BrokerUnavailable(
                    f"no connection to {self.host}:{self.port} within {timeout_s:.1f} s"
                    + (f" ({refused})" if refused else "")
                )

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout_s: float = 10.0) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK.

        While disconnected the message stays queued in paho and goes out after the
        reconnect; a timeout does not cancel it (at-least-once delivery).

        Raises:
            ProtocolError: an invalid topic (wildcards, empty) or a payload too large.
            PublishRefused: the broker refused it (MQTT 5 only; e.g. 135, its ACL).
            BrokerUnavailable: no PUBACK within `timeout_s`.
        """
        pending = self.publish_nowait(topic, payload, retain)
        try:
            self.wait_published(pending, timeout_s)
        except PublishRefused as exc:
            raise PublishRefused(
                f"broker refused the publish to {topic!r}: {exc.reason} ({exc.reason_code})",
                exc.reason_code,
                exc.reason,
            ) from None

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue a QoS 1 publish; pass the result to `wait_published` (lets senders pipeline)."""
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
        except ValueError as exc:
            raise ProtocolError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # paho kept the message in its outgoing queue and sends it after the
            # reconnect; clear the code so wait_for_publish waits instead of raising.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        return info

    def wait_published(self, info: mqtt.MQTTMessageInfo, timeout_s: float) -> None:
        """Wait for the PUBACK of a `publish_nowait`.

        Raises:
            PublishRefused: the broker acked it with a failure reason (MQTT 5 only).
            BrokerUnavailable: no PUBACK within `timeout_s`, or paho dropped the message.
        """
        try:
            info.wait_for_publish(timeout_s)
            published = info.is_published()
        except (ValueError, RuntimeError) as exc:
            raise BrokerUnavailable(f"publish failed: {exc}") from exc
        if not published:
            raise BrokerUnavailable(f"no PUBACK within {timeout_s:.1f} s (connected: {self.connected})")
        with self._acks:
            refused = self._refused_pubs.pop(info.mid, None)
        if refused is not None:
            raise PublishRefused(
                f"broker refused publish {info.mid}: {refused} ({refused.value})", int(refused.value), str(refused)
            )

    def subscribe(self, topic_filter: str, timeout_s: float = 10.0) -> None:
        """Subscribe with QoS 1, remembered and renewed on every reconnect.

        Waits for the SUBACK when connected; while disconnected the subscription
        is made on the next connect.

        Raises:
            ProtocolError: an invalid filter.
            ConfigError: the broker refused the subscription (ACL).
            BrokerUnavailable: no SUBACK within `timeout_s`.
        """
        with self._lock:
            if topic_filter not in self._filters:
                self._filters.append(topic_filter)
        try:
            rc, mid = self._client.subscribe(topic_filter, qos=1)
        except ValueError as exc:
            with self._lock:
                self._filters.remove(topic_filter)
            raise ProtocolError(f"cannot subscribe to {topic_filter!r}: {exc}") from exc
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN or mid is None:
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"subscribe to {topic_filter!r} failed: {mqtt.error_string(rc)}")
        deadline = time.monotonic() + timeout_s
        with self._acks:
            while mid not in self._subacks:
                if not self.connected:
                    return  # the next connect renews every remembered filter
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnavailable(f"no SUBACK for {topic_filter!r} within {timeout_s:.1f} s")
                self._acks.wait(min(left, 0.1))
            reasons = self._subacks.pop(mid)
        if any(r.is_failure for r in reasons):
            with self._lock:
                self._filters.remove(topic_filter)
            raise ConfigError(f"broker refused the subscription to {topic_filter!r}")

    def get(self, timeout_s: float | None = None) -> Event | None:
        """The next event (put-back events first), or None after `timeout_s`."""
        if self._held:
            return self._held.popleft()
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def put_back(self, events: Iterable[Event]) -> None:
        """Return events a consumer read but does not handle; `get` yields them next, in order."""
        self._held.extendleft(reversed(list(events)))

    def close(self) -> None:
        """Disconnect cleanly (no last will; the broker keeps the session) and stop the thread."""
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False
        self._connected.clear()
