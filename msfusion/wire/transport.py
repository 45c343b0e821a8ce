"""The MQTT transport adapter: the only module that imports paho.

`MqttTransport` speaks MQTT v3.1.1 with a persistent session
(``clean_session=False`` and a stable client id): the broker keeps the
client's subscriptions and queues QoS 1 messages while it is offline, and
delivers them when the same client id connects again. Every publish and
subscription is QoS 1, so a message may arrive twice; receivers handle
messages idempotently (see `protocol.TrainTask.key`).

Threading: paho's network thread (``loop_start``) runs the callbacks, which
only put events on `MqttTransport.events` (or note an ack) and return. The
caller's thread does all the work, reading events with `get`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Union
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from msfusion.errors import ConfigError, DeviceLost, ProtocolError

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
_REFUSED_AS_CONFIG = {"Bad user name or password", "Not authorized", "Client identifier not valid"}


class BrokerUnavailable(DeviceLost):
    """This side cannot reach the broker (not connected, or an ack did not come in time)."""


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


def parse_broker_url(url: str) -> tuple[str, int]:
    """Split ``mqtt://host:port`` (or ``host:port``, ``host``) into host and port.

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp"):
        raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// (TLS is not supported yet)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {exc}") from exc
    if not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"broker URL {url!r}: expected mqtt://host:port")
    return parts.hostname, port


class MqttTransport:
    """A paho client with QoS 1, a persistent session, acks awaited with timeouts.

    Args:
        client_id: stable across restarts, so the broker keeps this client's session.
        host, port: the broker.
        username, password: broker credentials (a device logs in as its device id).
        will: ``(topic, payload, retain)`` the broker publishes if this client vanishes.
        keepalive_s: MQTT keepalive; the will fires about 1.5x this after a silent death.
        reconnect_min_s, reconnect_max_s: backoff between reconnect attempts.
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
    ) -> None:
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive_s = keepalive_s
        self.events: queue.Queue[Event] = queue.Queue()
        self._held: deque[Event] = deque()  # put back by the consumer; read before `events`
        self._filters: list[str] = []
        self._lock = threading.Lock()
        self._acks = threading.Condition()
        self._subacks: OrderedDict[int, list[Any]] = OrderedDict()
        self._ignored_subacks: set[int] = set()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._started = False

        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self._client.max_queued_messages_set(0)
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
            BrokerUnavailable: no PUBACK within `timeout_s`.
        """
        pending = self.publish_nowait(topic, payload, retain)
        self.wait_published(pending, timeout_s)

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
            BrokerUnavailable: no PUBACK within `timeout_s`, or paho dropped the message.
        """
        try:
            info.wait_for_publish(timeout_s)
            published = info.is_published()
        except (ValueError, RuntimeError) as exc:
            raise BrokerUnavailable(f"publish failed: {exc}") from exc
        if not published:
            raise BrokerUnavailable(f"no PUBACK within {timeout_s:.1f} s (connected: {self.connected})")

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
