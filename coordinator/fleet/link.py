"""The coordinator's end of the wire: typed messages in, tasks and bulk data out, bytes counted.

`CoordinatorLink.poll` turns broker events into typed inbound events: device
messages (`Inbound`), completed slice transfers (`SliceArrived`) and
connection changes. Chunks and chunk requests are handled inside: slice
chunks are reassembled (any order, duplicates dropped, checksums verified),
and requests for artifact or weight chunks are served from what was offered,
only to the devices it was sent to and each chunk a few times (`bulk.ServeLimit`).
Per-device byte counters are the only state that lives as long as the run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Union

import msgspec

from msfusion.errors import ArtifactError, MsfusionError, ProtocolError
from msfusion.wire import topics
from msfusion.wire.bulk import BulkReceiver, BulkSender, ServeLimit, iter_chunks
from msfusion.wire.protocol import (
    BulkRef,
    Chunk,
    ChunkRequest,
    Heartbeat,
    Message,
    ProfileReport,
    Registration,
    RunControl,
    SliceResult,
    TaskFailed,
    TrainTask,
    Welcome,
    decode,
    encode,
)
from msfusion.wire.signing import MessageSigner, ResultAuthenticator
from msfusion.wire.transport import ConnectionChanged, MqttTransport, Received

log = logging.getLogger(__name__)

DeviceMessage = Union[Registration, Heartbeat, SliceResult, TaskFailed, ProfileReport]


@dataclass(frozen=True)
class Inbound:
    """A message a device sent; `retained` for a broker-kept copy (status, registration)."""

    device_id: str
    message: DeviceMessage
    retained: bool = False


@dataclass(frozen=True)
class SliceArrived:
    """A slice transfer completed and matched its sha256; `payload` is the packed weights."""

    device_id: str
    result: SliceResult
    payload: bytes


@dataclass(frozen=True)
class Malformed:
    """A message from a device that failed decoding or validation (logged, never fatal)."""

    device_id: str
    reason: str


LinkEvent = Union[Inbound, SliceArrived, Malformed, ConnectionChanged]


@dataclass
class _Pending:
    """A slice whose manifest arrived and whose chunks are still coming."""

    device_id: str
    result: SliceResult
    last_progress: float
    requests: int = 0


@dataclass
class _Offer:
    """A transfer devices may ask chunks of: only the devices it was sent to (their tasks name it)."""

    manifest: BulkRef
    data: bytes
    devices: set[str]


PUBLISH_WINDOW = 256  # publishes the coordinator keeps awaiting their PUBACK at once (tasks, chunks, clears)
PUBLISH_TIMEOUT_S = 30.0  # for one PUBACK
MAX_PENDING_PER_DEVICE = 4  # slices of one device received at once; a newer result evicts its oldest


def chunk_bytes(manifest: BulkRef, indices: Iterable[int] | None, sent: int) -> int:
    """Bytes on the wire of `sent` chunks of a transfer (those at `indices`, or all): data plus each chunk's framing."""
    last = manifest.n_chunks - 1
    data_bytes = sum(
        manifest.total_bytes - last * manifest.chunk_bytes if i == last else manifest.chunk_bytes
        for i in (indices if indices is not None else range(manifest.n_chunks))
    )
    # Every chunk's payload is its data plus the same framing (ids, index, sha256).
    empty = Chunk(transfer_id=manifest.transfer_id, index=last, n_chunks=manifest.n_chunks, sha256="0" * 64, data=b"")
    return data_bytes + sent * len(encode(empty, validate=False))


class CoordinatorLink:
    """Sends tasks, serves bulk data and collects slices over one transport.

    Args:
        transport: a connected MQTT transport.
        run_id: the run.
        stall_s: seconds without a new chunk of a slice before asking for the missing ones.
        max_requests: requests per slice without progress before it is given up.
        signer: signs every task and control message (None: unsigned, for devices without the key).
        session: the coordinator session, stamped (and signed) on every welcome and stop: a device
            obeys a stop only from the session that admitted it, so an old queued stop cannot end a new run.
        results: each device's result key (`wire/signing.py`): when given, a `SliceResult` or
            `TaskFailed` whose MAC does not check out under its device's key (or from a device
            with none) is dropped with a log line and counted nowhere. None: results unauthenticated.
    """

    def __init__(
        self,
        transport: MqttTransport,
        run_id: str,
        stall_s: float = 5.0,
        max_requests: int = 3,
        signer: MessageSigner | None = None,
        results: Mapping[str, ResultAuthenticator] | None = None,
        session: str = "",
    ) -> None:
        self.transport = transport
        self.signer = signer
        self.session = session
        self.results = results
        self.run_id = run_id
        self.stall_s = stall_s
        self.max_requests = max_requests
        self.bytes_down: Counter[str] = Counter()  # per device, payload bytes published to it
        self.bytes_up: Counter[str] = Counter()  # per device, payload bytes received from it
        self._receiver = BulkReceiver()
        self._pending: dict[str, _Pending] = {}  # transfer id -> slice awaiting chunks
        self._offers: dict[str, _Offer] = {}  # transfer id -> what devices may request
        self._limits: dict[tuple[str, str], ServeLimit] = {}  # (device, transfer) -> its re-sends so far
        self._refusals: set[tuple[str, str]] = set()  # (device, transfer) requests refused (logged once)
        self._ready: deque[SliceArrived] = deque()  # slices complete when their result came, emitted next
        self._retained: set[str] = set()  # devices whose registration or status the broker may retain

    def subscribe(self) -> None:
        """Subscribe to everything devices send in this run."""
        for topic_filter in topics.coordinator_filters(self.run_id):
            self.transport.subscribe(topic_filter)

    # Out.

    def publish(self, device_id: str, topic: str, payload: bytes, retain: bool = False, wait: bool = True) -> None:
        """Publish to a device's topic, counting the bytes (`wait`: for its PUBACK; else queued in paho)."""
        self.bytes_down[device_id] += len(payload)
        if wait:
            self.transport.publish(topic, payload, retain=retain)
        else:
            self.transport.publish_nowait(topic, payload, retain=retain)

    def send(self, device_id: str, msg: Message, wait: bool = True) -> None:
        """A control message (Welcome, RunControl) to one device, signed when the link has a signer.

        `wait` False: queued (QoS 1) without waiting for the broker's PUBACK, for a message the
        device asks for again if it is lost (a Welcome: a device re-registers until welcomed).
        """
        if isinstance(msg, Welcome):
            msg = msgspec.structs.replace(msg, session=self.session)
            msg = msg if self.signer is None else self.signer.sign(msg)
        elif isinstance(msg, RunControl):
            msg = msgspec.structs.replace(msg, session=self.session)
            msg = msg if self.signer is None else self.signer.sign(msg)
        self.publish(device_id, topics.ctl(self.run_id, device_id), encode(msg), wait=wait)

    def offer(self, manifest: BulkRef, data: bytes) -> None:
        """Make a transfer available (artifacts are pulled, not pushed) to the devices whose task names it."""
        known = self._offers.get(manifest.transfer_id)
        self._offers[manifest.transfer_id] = _Offer(manifest, data, known.devices if known is not None else set())

    def withdraw(self, transfer_id: str) -> None:
        """Stop serving a transfer (its round is over)."""
        self._offers.pop(transfer_id, None)
        for key in [k for k in self._limits if k[1] == transfer_id]:
            del self._limits[key]

    def send_task(self, task: TrainTask, weights: bytes) -> None:
        """Publish a task, then push its weight chunks; the weights stay offered for re-requests.

        The task's artifact and weights become requestable by its device, each chunk a few times
        (`bulk.ServeLimit`), counted afresh from each task sent.
        """
        self.send_tasks([(task, weights)])

    def send_tasks(self, tasks: Iterable[tuple[TrainTask, bytes]], window: int = PUBLISH_WINDOW) -> None:
        """`send_task` for many tasks, pipelined: up to `window` publishes await their PUBACK at once.

        One device after another, each waiting for its acks, a round of thousands of devices
        would spend seconds on round trips alone (bench/scale.py). The order is kept: a
        device's task goes out before its chunks.

        Raises:
            BrokerUnavailable: a PUBACK did not come in time (what was queued still goes out).
        """
        with self._pipeline(window) as put:
            for task, weights in tasks:
                self.offer(task.weights, weights)
                for transfer in (task.weights, task.artifact):
                    if transfer.transfer_id in self._offers:
                        self._offers[transfer.transfer_id].devices.add(task.device_id)
                    self._limits.pop((task.device_id, transfer.transfer_id), None)
                if self.signer is not None:
                    task = self.signer.sign(task)
                put(task.device_id, topics.task(self.run_id, task.device_id), encode(task))
                self._push(task.device_id, task.weights, weights, put=put)

    @contextlib.contextmanager
    def _pipeline(self, window: int, timeout_s: float = PUBLISH_TIMEOUT_S) -> Iterator[Callable[..., None]]:
        """A `put(device, topic, payload, retain=False)` that keeps up to `window` publishes in flight."""
        pending: deque[Any] = deque()

        def put(device_id: str | None, topic: str, payload: bytes, retain: bool = False) -> None:
            if device_id is not None:
                self.bytes_down[device_id] += len(payload)
            pending.append(self.transport.publish_nowait(topic, payload, retain=retain))
            if len(pending) >= window:
                self.transport.wait_published(pending.popleft(), timeout_s)

        yield put
        while pending:
            self.transport.wait_published(pending.popleft(), timeout_s)

    def _push(
        self,
        device_id: str,
        manifest: BulkRef,
        data: bytes,
        indices: list[int] | None = None,
        put: Callable[..., None] | None = None,
    ) -> None:
        topic = topics.bulk(self.run_id, device_id, manifest.transfer_id)
        if put is None:
            sent = BulkSender(self.transport, topic, manifest, data).send(indices)
            self.bytes_down[device_id] += chunk_bytes(manifest, indices, sent)
            return
        sent = 0
        for chunk in iter_chunks(manifest, data, indices):
            # Our own chunks: skip encode's re-decode, which would copy every MiB again.
            put(None, topic, encode(chunk, validate=False))
            sent += 1
        self.bytes_down[device_id] += chunk_bytes(manifest, indices, sent)

    def take_ready(self) -> list[SliceArrived]:
        """The slices complete but not yet emitted by `poll` (the round loop takes them before it closes)."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def clear_retained(self, timeout_s: float = 5.0) -> int:
        """Delete what the broker retains of this run: every seen device's registration and status.

        Publishes an empty retained message to each such topic (MQTT's way to delete a retained
        message). Call it at the end of a run, once the devices were told to stop: a daemon told
        to stop clears its own topics too, so one still finishing a task leaves nothing behind.

        Returns:
            How many topics were cleared.
        """
        cleared = 0
        try:
            with self._pipeline(PUBLISH_WINDOW, timeout_s) as put:  # thousands of devices: not a round trip each
                for device_id in sorted(self._retained):
                    for topic in (topics.register(self.run_id, device_id), topics.status(self.run_id, device_id)):
                        put(None, topic, b"", retain=True)
                        cleared += 1
        except MsfusionError as exc:
            log.warning("could not clear every retained message of the run: %s", exc)
        return cleared

    def forget_slices(self, keep: Collection[str] = ()) -> None:
        """Drop every half-received slice (the round closed) but those of the devices in `keep` (late tasks)."""
        for transfer_id, pending in list(self._pending.items()):
            if pending.device_id not in keep:
                self._receiver.drop(transfer_id)
                del self._pending[transfer_id]
        kept = [arrived for arrived in self._ready if arrived.device_id in keep]
        self._ready.clear()
        self._ready.extend(kept)

    # In.

    def poll(self, timeout_s: float) -> LinkEvent | None:
        """The next event for the round loop, or None after `timeout_s` of nothing to report."""
        if self._ready:
            return self._ready.popleft()
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.transport.get(max(0.0, deadline - time.monotonic()))
            if event is None:
                return None
            if isinstance(event, ConnectionChanged):
                return event
            out = self._handle(event)
            if out is not None:
                return out
            if time.monotonic() >= deadline:
                return None

    def _handle(self, event: Received) -> LinkEvent | None:
        try:
            where = topics.parse(event.topic)
        except ProtocolError as exc:
            log.warning("ignored a message on %s: %s", event.topic, exc)
            return None
        if where.run_id != self.run_id:
            return None
        device_id = where.device_id
        self.bytes_up[device_id] += len(event.payload)
        if where.kind in (topics.REGISTER, topics.STATUS):
            self._retained.add(device_id)
        if not event.payload:  # a retained message deleted (the end of a run, or a device's exit)
            return None
        try:
            msg = decode(event.payload)
        except ProtocolError as exc:
            log.warning("malformed message from %s on %s: %s", device_id, where.kind, exc)
            return Malformed(device_id, str(exc))
        if isinstance(msg, Chunk) and where.kind == topics.UP:
            return self._on_chunk(device_id, msg)
        if isinstance(msg, ChunkRequest) and where.kind == topics.REQ:
            self._serve(device_id, msg)
            return None
        if isinstance(msg, (Registration, Heartbeat, SliceResult, TaskFailed, ProfileReport)):
            if msg.device_id != device_id or msg.run_id != self.run_id:
                reason = f"{type(msg).__name__} for {msg.run_id}/{msg.device_id} on the topic of {device_id}"
                log.warning("refused: %s", reason)
                return Malformed(device_id, reason)
            if isinstance(msg, (SliceResult, TaskFailed)) and not self._authentic(msg):
                return None
            return Inbound(device_id, msg, event.retained)
        log.warning("unexpected %s from %s on %s", type(msg).__name__, device_id, where.kind)
        return None

    def _authentic(self, msg: SliceResult | TaskFailed) -> bool:
        """Whether a reply carries its device's MAC (always, without result keys). Logs why not."""
        if self.results is None:
            return True
        authenticator = self.results.get(msg.device_id)
        try:
            if authenticator is None:
                raise ProtocolError("no result key is enrolled for this device")
            authenticator.check(msg)
        except ProtocolError as exc:
            log.warning("dropped a %s for task %s under %s: %s", type(msg).__name__, msg.task_id, msg.device_id, exc)
            return False
        return True

    def expect_slice(self, result: SliceResult) -> None:
        """Start receiving a result's slice; `poll` emits a `SliceArrived` once all its chunks are in.

        Every slice reaches the round loop the same way, as a `SliceArrived`
        event, whether its chunks came before its result or after.
        """
        transfer_id = result.weights.transfer_id
        held = [t for t, p in self._pending.items() if p.device_id == result.device_id and t != transfer_id]
        for oldest in held[: max(0, len(held) - MAX_PENDING_PER_DEVICE + 1)]:
            log.warning("dropped slice transfer %s of %s: a newer one came", oldest, result.device_id)
            self._receiver.drop(oldest)
            del self._pending[oldest]
        self._pending[transfer_id] = _Pending(result.device_id, result, time.monotonic())
        try:
            payload = self._receiver.expect(result.weights, sender=result.device_id)
        except ArtifactError as exc:
            log.warning("slice of %s failed its manifest: %s", result.device_id, exc)
            del self._pending[transfer_id]
            return
        arrived = self._finish(transfer_id, payload)
        if arrived is not None:
            self._ready.append(arrived)

    def _on_chunk(self, device_id: str, chunk: Chunk) -> LinkEvent | None:
        pending = self._pending.get(chunk.transfer_id)
        if pending is not None and pending.device_id != device_id:
            log.warning("chunk of %s's transfer %s came from %s", pending.device_id, chunk.transfer_id, device_id)
            return None
        try:
            payload = self._receiver.feed(chunk, sender=device_id)
        except ArtifactError as exc:
            log.warning("dropped a chunk from %s: %s", device_id, exc)
            return None
        if pending is not None:
            pending.last_progress = time.monotonic()
            pending.requests = 0
        return self._finish(chunk.transfer_id, payload)

    def _finish(self, transfer_id: str, payload: bytes | None) -> SliceArrived | None:
        if payload is None:
            return None
        pending = self._pending.pop(transfer_id, None)
        if pending is None:
            return None
        return SliceArrived(pending.device_id, pending.result, payload)

    def _serve(self, device_id: str, request: ChunkRequest) -> None:
        """Re-send requested chunks of a transfer to the device it was sent to, each a few times at most."""
        offer = self._offers.get(request.transfer_id)
        key = (device_id, request.transfer_id)
        if offer is None or device_id not in offer.devices or request.device_id != device_id:
            if key not in self._refusals:  # once: a flood of requests must not flood the log
                if len(self._refusals) >= 10_000:
                    self._refusals.clear()
                self._refusals.add(key)
                log.warning("refused %s chunks of transfer %s: it was not sent to it", device_id, request.transfer_id)
            return
        limit = self._limits.setdefault(key, ServeLimit())
        indices = limit.take(i for i in request.missing if i < offer.manifest.n_chunks)
        if not indices:
            return
        try:
            self._push(device_id, offer.manifest, offer.data, indices)
        except MsfusionError as exc:
            log.warning("could not serve %s to %s: %s", request.transfer_id, device_id, exc)

    def request_stalled(self) -> list[SliceResult]:
        """Ask devices for the missing chunks of stalled slices; returns the results whose slices were given up on."""
        now = time.monotonic()
        lost = []
        for transfer_id, pending in list(self._pending.items()):
            if now - pending.last_progress < self.stall_s:
                continue
            if pending.requests >= self.max_requests:
                lost.append(pending.result)
                self._receiver.drop(transfer_id)
                del self._pending[transfer_id]
                continue
            missing = self._receiver.missing(transfer_id)
            if not missing:
                continue
            pending.requests += 1
            pending.last_progress = now
            log.info("slice of %s stalled; asking for %d chunks", pending.device_id, len(missing))
            request = ChunkRequest(
                run_id=self.run_id, device_id=pending.device_id, transfer_id=transfer_id, missing=missing
            )
            self.publish(pending.device_id, topics.upreq(self.run_id, pending.device_id), encode(request))
        return lost
