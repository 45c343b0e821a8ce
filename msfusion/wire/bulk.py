"""Bulk transfers (artifacts, weights, slices): a manifest plus checksummed chunks.

A payload never travels as one MQTT message. The sender computes a `BulkRef`
manifest (size, sha256, chunk count), which rides inside a small message
(`TrainTask`, `SliceResult`), and publishes `Chunk`s of at most 1 MiB, each
with its own sha256, to a per-transfer topic. The receiver accepts chunks in
any order, ignores duplicates (QoS 1 redelivers), drops corrupt ones, checks
the whole payload against the manifest, and asks for missing chunks with a
`ChunkRequest` when progress stalls. Memory stays O(payload).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from msfusion.errors import ArtifactError, DeviceLost, ProtocolError
from msfusion.wire.protocol import (
    MAX_CHUNK_BYTES,
    BulkKind,
    BulkRef,
    Chunk,
    ChunkRequest,
    decode,
    encode,
)
from msfusion.wire.transport import Event, Received

log = logging.getLogger(__name__)

STOP_POLL_S = 0.5  # how often `receive` looks at its `stop` event while no chunk arrives


class TransferIncomplete(DeviceLost):
    """A bulk transfer did not complete: chunks stayed missing after the retries."""

    def __init__(self, message: str, *, transfer_id: str = "", missing: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.transfer_id = transfer_id
        self.missing = list(missing)


class BulkTransport(Protocol):
    """The part of `transport.Transport` bulk transfers use."""

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> Any: ...

    def wait_published(self, info: Any, timeout_s: float) -> None: ...

    def get(self, timeout_s: float | None = None) -> Event | None: ...

    def put_back(self, events: Iterable[Event]) -> None: ...


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def transfer_id(prefix: str, *parts: str) -> str:
    """A transfer id: `prefix-part-part...`, or `prefix-<sha256[:40]>` of it when too long for an id (64)."""
    text = "-".join((prefix, *parts))
    return text if len(text) <= 64 else f"{prefix}-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def slice_transfer_id(task_id: str, device_id: str) -> str:
    """The upload id of a device's trained slice for one task: what its daemon uses, and the coordinator expects."""
    return transfer_id("s", task_id, device_id)


def make_manifest(transfer_id: str, kind: BulkKind, data: bytes, chunk_bytes: int = MAX_CHUNK_BYTES) -> BulkRef:
    """Describe `data` as a transfer of chunks of `chunk_bytes` (the last may be shorter).

    Raises:
        ProtocolError: `chunk_bytes` outside 1..1 MiB.
    """
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"chunk_bytes {chunk_bytes} outside 1..{MAX_CHUNK_BYTES}")
    n_chunks = max(1, -(-len(data) // chunk_bytes))
    return BulkRef(
        transfer_id=transfer_id,
        kind=kind,
        total_bytes=len(data),
        sha256=sha256_hex(data),
        n_chunks=n_chunks,
        chunk_bytes=chunk_bytes,
    )


def chunk_size(manifest: BulkRef, index: int) -> int:
    """Bytes in chunk `index`: `chunk_bytes`, except for a shorter last one."""
    if index < manifest.n_chunks - 1:
        return manifest.chunk_bytes
    return manifest.total_bytes - (manifest.n_chunks - 1) * manifest.chunk_bytes


def iter_chunks(manifest: BulkRef, data: bytes, indices: Iterable[int] | None = None) -> Iterator[Chunk]:
    """Yield the chunks of `data` (all, or those in `indices`), one at a time.

    Raises:
        ProtocolError: `data` does not have the manifest's size, or an index is out of range.
    """
    if len(data) != manifest.total_bytes:
        raise ProtocolError(f"{len(data)} bytes do not match manifest of {manifest.total_bytes}")
    view = memoryview(data)
    for index in range(manifest.n_chunks) if indices is None else indices:
        if not 0 <= index < manifest.n_chunks:
            raise ProtocolError(f"chunk {index} outside 0..{manifest.n_chunks - 1}")
        start = index * manifest.chunk_bytes
        piece = bytes(view[start : start + chunk_size(manifest, index)])
        yield Chunk(
            transfer_id=manifest.transfer_id,
            index=index,
            n_chunks=manifest.n_chunks,
            sha256=sha256_hex(piece),
            data=piece,
        )


class Reassembly:
    """One incoming transfer: chunks in any order, verified piece by piece and whole."""

    def __init__(self, manifest: BulkRef) -> None:
        self.manifest = manifest
        # Only what arrived is held: the manifest's chunk count (a peer's claim) sizes nothing here.
        self._chunks: dict[int, bytes] = {}

    def add(self, chunk: Chunk) -> bool:
        """Store a chunk.

        Returns:
            True if it was new, False for a duplicate (ignored).

        Raises:
            ArtifactError: the chunk does not belong here or fails its checksum; it
                is dropped and stays missing.
        """
        m = self.manifest
        if chunk.transfer_id != m.transfer_id or chunk.n_chunks != m.n_chunks:
            raise ArtifactError(
                f"chunk of {chunk.transfer_id!r} ({chunk.n_chunks} chunks) does not fit "
                f"transfer {m.transfer_id!r} ({m.n_chunks} chunks)"
            )
        if chunk.index >= m.n_chunks:
            raise ArtifactError(f"chunk {chunk.index} outside 0..{m.n_chunks - 1}")
        if chunk.index in self._chunks:
            return False
        if len(chunk.data) != chunk_size(m, chunk.index):
            raise ArtifactError(
                f"chunk {chunk.index} of {m.transfer_id!r} has {len(chunk.data)} bytes, "
                f"expected {chunk_size(m, chunk.index)}"
            )
        if sha256_hex(chunk.data) != chunk.sha256:
            raise ArtifactError(f"chunk {chunk.index} of {m.transfer_id!r} fails its sha256")
        self._chunks[chunk.index] = chunk.data
        return True

    def missing(self) -> list[int]:
        """Indices of the chunks not received yet, ascending."""
        return [i for i in range(self.manifest.n_chunks) if i not in self._chunks]

    def complete(self) -> bool:
        return len(self._chunks) == self.manifest.n_chunks

    @property
    def received_bytes(self) -> int:
        return sum(len(piece) for piece in self._chunks.values())

    def payload(self) -> bytes:
        """The whole payload, checked against the manifest's sha256.

        Raises:
            TransferIncomplete: chunks are missing.
            ArtifactError: the payload does not match the manifest.
        """
        if not self.complete():
            missing = self.missing()
            raise TransferIncomplete(
                f"transfer {self.manifest.transfer_id!r} misses {len(missing)} chunks",
                transfer_id=self.manifest.transfer_id,
                missing=missing,
            )
        data = b"".join(self._chunks[i] for i in range(self.manifest.n_chunks))
        if sha256_hex(data) != self.manifest.sha256:
            raise ArtifactError(f"transfer {self.manifest.transfer_id!r} does not match its manifest sha256")
        return data


class BulkReceiver:
    """Several concurrent incoming transfers, fed from one event loop (the coordinator's).

    Chunks may arrive before their manifest (the sender publishes both at once);
    they are kept, up to `max_orphan_bytes`, until `expect` names their transfer.
    """

    def __init__(self, max_orphan_bytes: int = 256 << 20) -> None:
        self.max_orphan_bytes = max_orphan_bytes
        self._active: dict[str, Reassembly] = {}
        # transfer id -> (sender, chunk) that came before their transfer was expected
        self._orphans: OrderedDict[str, list[tuple[str | None, Chunk]]] = OrderedDict()
        self._orphan_bytes = 0
        self._finished: deque[str] = deque(maxlen=1024)  # late duplicates of these are dropped

    def expect(self, manifest: BulkRef, sender: str | None = None) -> bytes | None:
        """Start (or keep) a transfer; returns the payload if early chunks already complete it.

        With `sender`, only early chunks that came from it count (the others are dropped): a
        peer that guessed another's transfer id cannot spoil its transfer with chunks sent first.
        """
        if manifest.transfer_id not in self._active:
            self._active[manifest.transfer_id] = Reassembly(manifest)
        payload = None
        for source, chunk in self._orphans.pop(manifest.transfer_id, []):
            self._orphan_bytes -= len(chunk.data)
            if sender is not None and source != sender:
                log.warning("dropped an early chunk of %s: it came from %s, not %s", chunk.transfer_id, source, sender)
                continue
            try:
                result = self.feed(chunk)
            except ArtifactError as exc:
                if manifest.transfer_id not in self._active:
                    raise  # the whole payload failed its manifest
                log.warning("dropped a chunk: %s", exc)
                continue
            if result is not None:
                payload = result
        return payload

    def feed(self, chunk: Chunk, sender: str | None = None) -> bytes | None:
        """Take one chunk; returns the verified payload when its transfer completes.

        `sender` names who sent it, kept with an early chunk (see `expect`).

        Raises:
            ArtifactError: a corrupt chunk (dropped), or a complete payload that fails
                the manifest (the transfer is dropped).
        """
        reassembly = self._active.get(chunk.transfer_id)
        if reassembly is None:
            if chunk.transfer_id not in self._finished:
                self._keep_orphan(chunk, sender)
            return None
        reassembly.add(chunk)
        if not reassembly.complete():
            return None
        del self._active[chunk.transfer_id]
        self._finished.append(chunk.transfer_id)
        return reassembly.payload()

    def missing(self, transfer_id: str) -> list[int]:
        reassembly = self._active.get(transfer_id)
        return reassembly.missing() if reassembly is not None else []

    def drop(self, transfer_id: str) -> None:
        """Forget a transfer (given up on, or its device was lost)."""
        self._active.pop(transfer_id, None)
        for _, chunk in self._orphans.pop(transfer_id, []):
            self._orphan_bytes -= len(chunk.data)

    def _keep_orphan(self, chunk: Chunk, sender: str | None) -> None:
        self._orphans.setdefault(chunk.transfer_id, []).append((sender, chunk))
        self._orphan_bytes += len(chunk.data)
        while self._orphan_bytes > self.max_orphan_bytes and self._orphans:
            transfer_id, dropped = self._orphans.popitem(last=False)
            self._orphan_bytes -= sum(len(c.data) for _, c in dropped)
            log.warning("dropped %d early chunks of unknown transfer %s", len(dropped), transfer_id)


class ServeLimit:
    """How often the chunks of one transfer are sent again on request, to one receiver.

    Each chunk is re-sent at most `max_copies` times, and not again within
    `min_gap_s` of its last send (it is still on its way: a burst of requests
    costs one copy). A receiver's genuine re-requests come a stall apart
    (seconds), so they are served; a flood of requests cannot make the sender
    publish more than `max_copies` copies of the transfer.

    Args:
        max_copies: re-sends per chunk.
        min_gap_s: seconds before a chunk is re-sent again.
    """

    def __init__(self, max_copies: int = 4, min_gap_s: float = 0.25) -> None:
        self.max_copies = max_copies
        self.min_gap_s = min_gap_s
        self._sent: dict[int, tuple[int, float]] = {}  # chunk index -> (re-sends, when last)
        self.refused = 0  # chunk re-sends refused so far

    def take(self, indices: Iterable[int], now: float | None = None) -> list[int]:
        """The chunks of `indices` to re-send now (ascending, no duplicates); counts them as sent."""
        now = time.monotonic() if now is None else now
        allowed = []
        for index in sorted(set(indices)):
            copies, last = self._sent.get(index, (0, -float("inf")))
            if copies >= self.max_copies or now - last < self.min_gap_s:
                self.refused += 1
                continue
            self._sent[index] = (copies + 1, now)
            allowed.append(index)
        return allowed


class BulkSender:
    """Publishes one transfer's chunks to a topic and serves `ChunkRequest`s for it.

    Keep it (and so `data`) alive until the receiver is done with the transfer.

    Args:
        transport: a connected transport.
        topic: the chunk topic (`topics.bulk` or `topics.up`).
        manifest: from `make_manifest(data)`.
        data: the payload.
        window: publishes awaiting their PUBACK at once (bounds paho's queue).
        limit: how often `serve` re-sends each chunk (a fresh `ServeLimit` when None).
    """

    def __init__(
        self,
        transport: BulkTransport,
        topic: str,
        manifest: BulkRef,
        data: bytes,
        window: int = 8,
        limit: ServeLimit | None = None,
    ) -> None:
        if len(data) != manifest.total_bytes:
            raise ProtocolError(f"{len(data)} bytes do not match manifest of {manifest.total_bytes}")
        self.transport = transport
        self.topic = topic
        self.manifest = manifest
        self.data = data
        self.window = window
        self.limit = limit if limit is not None else ServeLimit()

    def send(self, indices: Iterable[int] | None = None, timeout_s: float = 30.0) -> int:
        """Publish all chunks (or those in `indices`), waiting for every PUBACK.

        Returns:
            How many chunks were published.

        Raises:
            BrokerUnavailable: a PUBACK did not come within `timeout_s`.
        """
        pending: deque[Any] = deque()
        sent = 0
        for chunk in iter_chunks(self.manifest, self.data, indices):
            # Our own chunks: skip encode's re-decode, which would copy every MiB again.
            pending.append(self.transport.publish_nowait(self.topic, encode(chunk, validate=False)))
            sent += 1
            if len(pending) >= self.window:
                self.transport.wait_published(pending.popleft(), timeout_s)
        while pending:
            self.transport.wait_published(pending.popleft(), timeout_s)
        return sent

    def serve(self, request: ChunkRequest, timeout_s: float = 30.0) -> int:
        """Republish the chunks a receiver asked for, as far as `limit` allows.

        Returns:
            How many chunks were published (0 when the limit refused them all).

        Raises:
            ProtocolError: the request is for another transfer or names no such chunk.
        """
        if request.transfer_id != self.manifest.transfer_id:
            raise ProtocolError(f"request for {request.transfer_id!r} sent to {self.manifest.transfer_id!r}")
        bad = [i for i in request.missing if i >= self.manifest.n_chunks]
        if bad:
            raise ProtocolError(f"request names chunks {bad[:8]} of a {self.manifest.n_chunks}-chunk transfer")
        indices = self.limit.take(request.missing)
        if len(indices) < len(set(request.missing)):
            log.debug(  # debug: a flood of requests must not flood the log too
                "transfer %s: re-sending %d of %d requested chunks (each at most %d times)",
                self.manifest.transfer_id,
                len(indices),
                len(set(request.missing)),
                self.limit.max_copies,
            )
        return self.send(indices, timeout_s) if indices else 0


def receive(
    transport: BulkTransport,
    manifest: BulkRef,
    topic: str,
    timeout_s: float,
    request_missing: Callable[[list[int]], None] | None = None,
    retries: int = 2,
    pull: bool = False,
    stop: threading.Event | None = None,
) -> bytes:
    """Receive one transfer from `topic` (already subscribed), blocking.

    Events that are not this transfer's chunks are put back on the transport in
    order. When no new chunk arrives for `timeout_s`, `request_missing` is called
    with the missing indices (it publishes a `ChunkRequest`), at most `retries`
    times in a row without progress.

    Args:
        transport: a connected transport subscribed to `topic`.
        manifest: the transfer's `BulkRef`.
        topic: where its chunks arrive.
        timeout_s: the stall window: seconds without a new chunk before asking again.
        request_missing: asks the sender for chunks; None never asks.
        retries: requests in a row without progress before giving up.
        pull: ask for every chunk first (the sender publishes only on request).
        stop: once set, give up within `STOP_POLL_S` (the receiver is shutting down).

    Returns:
        The verified payload.

    Raises:
        TransferIncomplete: chunks still missing after the retries, or when `stop` was set.
        ArtifactError: the complete payload does not match the manifest.
    """
    reassembly = Reassembly(manifest)
    held: list[Event] = []
    stalls = 0
    try:
        if pull and request_missing is not None:
            request_missing(reassembly.missing())
        last_progress = time.monotonic()
        while not reassembly.complete():
            if stop is not None and stop.is_set():
                missing = reassembly.missing()
                raise TransferIncomplete(
                    f"transfer {manifest.transfer_id!r}: stopped with {len(missing)} of {manifest.n_chunks} "
                    "chunks missing",
                    transfer_id=manifest.transfer_id,
                    missing=missing,
                )
            left = last_progress + timeout_s - time.monotonic()
            if left <= 0:
                missing = reassembly.missing()
                if request_missing is None or stalls >= retries:
                    raise TransferIncomplete(
                        f"transfer {manifest.transfer_id!r}: {len(missing)} of {manifest.n_chunks} "
                        f"chunks missing after {stalls} requests",
                        transfer_id=manifest.transfer_id,
                        missing=missing,
                    )
                stalls += 1
                log.info("transfer %s stalled; asking for %d chunks", manifest.transfer_id, len(missing))
                request_missing(missing)
                last_progress = time.monotonic()
                continue
            event = transport.get(left if stop is None else min(left, STOP_POLL_S))
            if event is None:
                continue
            if not isinstance(event, Received) or event.topic != topic:
                held.append(event)
                continue
            try:
                chunk = decode(event.payload)
            except ProtocolError as exc:
                log.warning("dropped a malformed message on %s: %s", topic, exc)
                continue
            if not isinstance(chunk, Chunk) or chunk.transfer_id != manifest.transfer_id:
                held.append(event)
                continue
            try:
                if reassembly.add(chunk):
                    last_progress = time.monotonic()
                    stalls = 0
            except ArtifactError as exc:
                log.warning("dropped a chunk: %s", exc)
        return reassembly.payload()
    finally:
        transport.put_back(held)
