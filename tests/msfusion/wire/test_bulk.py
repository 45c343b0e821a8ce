"""Bulk transfers: chunking and reassembly, then real transfers over Mosquitto."""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time

import msgspec
import pytest

from msfusion.errors import ArtifactError, DeviceLost, ProtocolError
from msfusion.wire import topics
from msfusion.wire.bulk import (
    STOP_POLL_S,
    BulkReceiver,
    BulkSender,
    Reassembly,
    TransferIncomplete,
    iter_chunks,
    make_manifest,
    receive,
)
from msfusion.wire.protocol import MAX_CHUNK_BYTES, BulkRef, ChunkRequest, decode, encode
from msfusion.wire.transport import MqttTransport, Received

_ids = itertools.count()


def payload(n_bytes: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n_bytes)


# Chunking and reassembly, no broker.


def test_manifest_and_chunks_cover_the_payload() -> None:
    data = payload(10_000)
    manifest = make_manifest("t1", "artifact", data, chunk_bytes=4096)
    chunks = list(iter_chunks(manifest, data))
    assert (manifest.total_bytes, manifest.n_chunks, manifest.sha256) == (10_000, 3, hashlib.sha256(data).hexdigest())
    assert [len(c.data) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(c.data for c in chunks) == data
    assert all(c.sha256 == hashlib.sha256(c.data).hexdigest() and c.n_chunks == 3 for c in chunks)


def test_empty_payload_is_one_empty_chunk() -> None:
    manifest = make_manifest("empty", "slice", b"")
    reassembly = Reassembly(manifest)
    (chunk,) = iter_chunks(manifest, b"")
    assert reassembly.add(chunk) and reassembly.payload() == b""


def test_chunk_size_limits() -> None:
    with pytest.raises(ProtocolError):
        make_manifest("t", "slice", b"x", chunk_bytes=MAX_CHUNK_BYTES + 1)
    manifest = make_manifest("t", "slice", payload(3 * MAX_CHUNK_BYTES + 1))
    assert manifest.n_chunks == 4 and manifest.chunk_bytes == MAX_CHUNK_BYTES


def test_reassembly_out_of_order_with_duplicates() -> None:
    # Prepare
    data = payload(50_000, seed=1)
    manifest = make_manifest("t2", "weights", data, chunk_bytes=1000)
    chunks = list(iter_chunks(manifest, data))
    shuffled = chunks + chunks[:10]
    random.Random(2).shuffle(shuffled)
    reassembly = Reassembly(manifest)
    # Execute
    new = [reassembly.add(c) for c in shuffled]
    # Assert
    assert sum(new) == 50 and len(new) - sum(new) == 10
    assert reassembly.complete() and reassembly.missing() == []
    assert reassembly.payload() == data


def test_missing_lists_what_did_not_arrive() -> None:
    data = payload(10_000)
    manifest = make_manifest("t3", "weights", data, chunk_bytes=1000)
    reassembly = Reassembly(manifest)
    for chunk in iter_chunks(manifest, data, [0, 2, 3, 9]):
        reassembly.add(chunk)
    assert reassembly.missing() == [1, 4, 5, 6, 7, 8]
    assert not reassembly.complete() and reassembly.received_bytes == 4000
    with pytest.raises(TransferIncomplete) as info:
        reassembly.payload()
    assert info.value.missing == [1, 4, 5, 6, 7, 8] and isinstance(info.value, DeviceLost)


def test_corrupt_chunk_is_rejected_and_stays_missing() -> None:
    data = payload(3000)
    manifest = make_manifest("t4", "slice", data, chunk_bytes=1000)
    good = list(iter_chunks(manifest, data))
    reassembly = Reassembly(manifest)
    flipped = bytes([good[1].data[0] ^ 0xFF]) + good[1].data[1:]
    with pytest.raises(ArtifactError, match="fails its sha256"):
        reassembly.add(msgspec.structs.replace(good[1], data=flipped))
    with pytest.raises(ArtifactError, match="has 999 bytes"):
        reassembly.add(msgspec.structs.replace(good[1], data=good[1].data[:-1]))
    with pytest.raises(ArtifactError, match="does not fit"):
        reassembly.add(msgspec.structs.replace(good[1], transfer_id="other"))
    assert reassembly.missing() == [0, 1, 2]
    for chunk in good:
        reassembly.add(chunk)
    assert reassembly.payload() == data


def test_payload_that_does_not_match_the_manifest_is_rejected() -> None:
    # Every chunk is intact, but the manifest describes other bytes.
    data = payload(3000)
    wrong = make_manifest("t5", "weights", payload(3000, seed=9), chunk_bytes=1000)
    reassembly = Reassembly(wrong)
    for chunk in iter_chunks(make_manifest("t5", "weights", data, chunk_bytes=1000), data):
        reassembly.add(chunk)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        reassembly.payload()


def test_receiver_keeps_chunks_that_arrive_before_their_manifest() -> None:
    data_a, data_b = payload(5000, 1), payload(2500, 2)
    man_a = make_manifest("a", "slice", data_a, chunk_bytes=1000)
    man_b = make_manifest("b", "slice", data_b, chunk_bytes=1000)
    chunks_a, chunks_b = list(iter_chunks(man_a, data_a)), list(iter_chunks(man_b, data_b))
    receiver = BulkReceiver()
    # Early chunks of `a`, before anyone expects it
    assert all(receiver.feed(c) is None for c in chunks_a[:3])
    assert receiver.expect(man_b) is None
    assert receiver.expect(man_a) is None and receiver.missing("a") == [3, 4]
    results = [receiver.feed(c) for c in chunks_b + chunks_a[3:]]
    assert [r for r in results if r is not None] == [data_b, data_a]
    # A late duplicate of a finished transfer is dropped, not kept as an orphan
    assert receiver.feed(chunks_a[0]) is None and receiver.missing("a") == []


def test_receiver_bounds_orphan_memory() -> None:
    data = payload(4000)
    manifest = make_manifest("big", "slice", data, chunk_bytes=1000)
    receiver = BulkReceiver(max_orphan_bytes=2500)
    for chunk in iter_chunks(manifest, data):
        receiver.feed(chunk)
    assert receiver.expect(manifest) is None
    # The third chunk passed the cap: the transfer's first three were dropped together.
    assert receiver.missing("big") == [0, 1, 2]


# Real transfers over Mosquitto.


@pytest.fixture
def pair(mosquitto: object):  # type: ignore[no-untyped-def]
    """(sender, receiver): two connected transports."""
    clients = [
        MqttTransport(f"bulk-{role}-{next(_ids)}", mosquitto.host, mosquitto.port)  # type: ignore[attr-defined]
        for role in ("coordinator", "device")
    ]
    for client in clients:
        client.connect(5)
    yield clients
    for client in clients:
        client.close()


def serve_requests(
    sender: BulkSender, transport: MqttTransport, stop: threading.Event, served: list[list[int]]
) -> None:
    """The sender's loop: answer ChunkRequests on its transport."""
    while not stop.is_set():
        event = transport.get(0.05)
        if isinstance(event, Received):
            request = decode(event.payload)
            assert isinstance(request, ChunkRequest)
            served.append(list(request.missing))
            sender.serve(request)


@pytest.mark.parametrize("drop", [(), (2,), (0, 4)], ids=["all-arrive", "one-dropped", "two-dropped"])
def test_transfer_over_mosquitto(pair, drop: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a 5 MB artifact for device d1; the coordinator "loses" some chunks
    coordinator, device = pair
    run, dev = "bulk", f"d{next(_ids)}"
    data = payload(5_000_000, seed=3)
    manifest = make_manifest("art-1", "artifact", data)
    chunk_topic, req_topic = topics.bulk(run, dev, "art-1"), topics.req(run, dev)
    device.subscribe(chunk_topic)
    coordinator.subscribe(req_topic)
    sender = BulkSender(coordinator, chunk_topic, manifest, data)
    stop, served = threading.Event(), []
    server = threading.Thread(target=serve_requests, args=(sender, coordinator, stop, served))
    server.start()

    def request_missing(missing: list[int]) -> None:
        request = ChunkRequest(run_id=run, device_id=dev, transfer_id="art-1", missing=missing)
        device.publish(req_topic, encode(request))

    try:
        # Execute
        sent = sender.send([i for i in range(manifest.n_chunks) if i not in drop])
        received = receive(device, manifest, chunk_topic, timeout_s=0.5, request_missing=request_missing)
    finally:
        stop.set()
        server.join()
    # Assert
    assert sent == manifest.n_chunks - len(drop) and manifest.n_chunks == 5
    assert received == data
    assert served == ([list(drop)] if drop else [])


def test_pull_transfer_and_unrelated_events_are_put_back(pair) -> None:  # type: ignore[no-untyped-def]
    coordinator, device = pair
    run, dev = "bulk", f"d{next(_ids)}"
    data = payload(1_500_000, seed=4)
    manifest = make_manifest("w-1", "weights", data)
    chunk_topic, req_topic, task_topic = topics.bulk(run, dev, "w-1"), topics.req(run, dev), topics.task(run, dev)
    for topic in (chunk_topic, task_topic):
        device.subscribe(topic)
    coordinator.subscribe(req_topic)
    sender = BulkSender(coordinator, chunk_topic, manifest, data)
    stop, served = threading.Event(), []
    server = threading.Thread(target=serve_requests, args=(sender, coordinator, stop, served))
    server.start()
    coordinator.publish(task_topic, b"unrelated")

    def request_missing(missing: list[int]) -> None:
        device.publish(req_topic, encode(ChunkRequest(run_id=run, device_id=dev, transfer_id="w-1", missing=missing)))

    try:
        received = receive(device, manifest, chunk_topic, timeout_s=2.0, request_missing=request_missing, pull=True)
    finally:
        stop.set()
        server.join()
    assert received == data and served == [[0, 1]]
    event = device.get(1.0)
    while not isinstance(event, Received):  # skip the connection event
        event = device.get(1.0)
    assert event == Received(task_topic, b"unrelated", False)


def _one_chunk_of_two(coordinator: MqttTransport, device: MqttTransport, transfer_id: str) -> tuple[BulkRef, str]:
    """A two-chunk transfer to `device` (subscribed to its topic) of which the sender published chunk 0 only."""
    data = payload(2000)
    manifest = make_manifest(transfer_id, "slice", data, chunk_bytes=1000)
    topic = topics.up("bulk", "d" + transfer_id.split("-")[0], transfer_id)
    device.subscribe(topic)
    BulkSender(coordinator, topic, manifest, data).send([0])
    return manifest, topic


def test_transfer_that_never_completes_raises_after_retries(pair) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the sender publishes one chunk of two, and nobody serves requests
    coordinator, device = pair
    manifest, topic = _one_chunk_of_two(coordinator, device, "lost-1")
    requests: list[list[int]] = []
    # Execute
    start = time.monotonic()
    with pytest.raises(TransferIncomplete) as info:
        receive(device, manifest, topic, timeout_s=0.2, request_missing=requests.append, retries=2)
    # Assert
    assert info.value.missing == [1] and requests == [[1], [1]]
    assert time.monotonic() - start < 5


def test_a_stopped_receiver_gives_up_at_once_not_after_its_stall_window(pair) -> None:  # type: ignore[no-untyped-def]
    # Prepare: one chunk of two arrives, the stall window is long, and the receiver's owner stops (SIGTERM).
    coordinator, device = pair
    manifest, topic = _one_chunk_of_two(coordinator, device, "stop-1")
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    requests: list[list[int]] = []
    # Execute
    start = time.monotonic()
    timer.start()
    with pytest.raises(TransferIncomplete, match="stopped with") as info:
        receive(device, manifest, topic, timeout_s=30.0, request_missing=requests.append, stop=stop)
    # Assert: it gave up within a poll of the stop, without asking for the missing chunk.
    assert 1 in info.value.missing and requests == []
    assert time.monotonic() - start < 0.3 + STOP_POLL_S + 1.0


def test_early_chunks_from_another_sender_cannot_spoil_a_transfer() -> None:
    # Prepare: a peer guessed device B's transfer id and sent a self-consistent but false chunk 0 first.
    data = payload(3000, 3)
    manifest = make_manifest("s-devB", "slice", data, chunk_bytes=1000)
    genuine = list(iter_chunks(manifest, data))
    forged_data = payload(3000, 4)
    forged = list(iter_chunks(make_manifest("s-devB", "slice", forged_data, chunk_bytes=1000), forged_data))[0]
    receiver = BulkReceiver()
    receiver.feed(forged, sender="devA")
    receiver.feed(genuine[1], sender="devB")
    # Execute: B's result arrives, then its other chunks
    assert receiver.expect(manifest, sender="devB") is None
    results = [receiver.feed(c, sender="devB") for c in (genuine[0], genuine[2])]
    # Assert: B's own bytes, whole
    assert results[-1] == data
