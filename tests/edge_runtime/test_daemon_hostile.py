"""The daemon against a hostile client that speaks the protocol: bounded tasks, refusals it did not ask for, SIGTERM.

Most tests drive `Daemon._handle` in-process over a fake transport; the SIGTERM test runs
`Daemon.run` in this (main) thread against a real Mosquitto.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import tracemalloc
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import msgspec
import numpy as np
import pytest

from msfusion.coordinator.fleet.rounds import tensor_axes
from msfusion.data.shards import write_shard
from msfusion.edge_runtime import trainer
from msfusion.edge_runtime.config import DeviceConfig
from msfusion.edge_runtime.daemon import Daemon, ExitCode
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.models.registry import model_spec
from msfusion.wire import topics
from msfusion.wire.artifacts import ArtifactKind, pack_artifact
from msfusion.wire.bulk import iter_chunks, make_manifest
from msfusion.wire.protocol import (
    BulkRef,
    ChunkRequest,
    SliceResult,
    TaskFailed,
    TrainTask,
    Welcome,
    decode,
    encode,
)
from msfusion.wire.transport import Event, MqttTransport, Received
from msfusion.wire.weights import pack_weights

RUN, DEV = "hostile", "dev000"
SHA = "0" * 64


class FakeTransport:
    """Records what the daemon publishes; hands it events a test queues."""

    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []
        self.events: deque[Event] = deque()

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout_s: float = 10.0) -> None:
        self.published.append((topic, payload, retain))

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.publish(topic, payload, retain)

    def wait_published(self, info: Any, timeout_s: float) -> None:
        pass

    def subscribe(self, topic_filter: str, timeout_s: float = 10.0) -> None:
        pass

    def get(self, timeout_s: float | None = None) -> Event | None:
        if self.events:
            return self.events.popleft()
        time.sleep(min(timeout_s or 0.0, 0.01))
        return None

    def put_back(self, events: Iterable[Event]) -> None:
        self.events.extendleft(reversed(list(events)))

    def close(self) -> None:
        pass

    def messages(self, kind: str) -> list[Any]:
        return [decode(p) for t, p, _ in self.published if topics.parse(t).kind == kind and p]


def _daemon(tmp_path: Path, **knobs: Any) -> tuple[Daemon, FakeTransport]:
    config = DeviceConfig(
        device_id=DEV,
        run_id=RUN,
        data_dir=tmp_path / "shard",
        state_dir=tmp_path / "state",
        memory_budget_bytes=512 << 20,
        stall_s=0.05,
        **knobs,
    )
    daemon = Daemon(config)
    fake = FakeTransport()
    daemon.transport = fake  # type: ignore[assignment]
    return daemon, fake


def _ref(transfer_id: str, kind: str = "weights", total: int = 1000, chunk: int = 1000) -> BulkRef:
    return BulkRef(
        transfer_id=transfer_id,
        kind=kind,  # type: ignore[arg-type]
        total_bytes=total,
        sha256=SHA,
        n_chunks=max(1, -(-total // chunk)),
        chunk_bytes=chunk,
    )


def _task(**fields: Any) -> TrainTask:
    base: dict[str, Any] = dict(
        run_id=RUN,
        round_idx=0,
        device_id=DEV,
        task_id="abcd-r0-a0",
        backend="ort",
        artifact=_ref("a-1", "artifact"),
        weights=_ref("w-1"),
        units={"g": [0, 1]},
        tensor_axes={},
        local_epochs=1,
        batch_size=8,
        lr=0.05,
        max_samples=0,
        mu=0.5,
        tau=0.5,
        contrastive="moon",
        optimizer="sgd",
        seed=1,
        deadline_s=60.0,
    )
    base.update(fields)
    return TrainTask(**base)


def _deliver(daemon: Daemon, topic: str, payload: bytes) -> None:
    daemon._handle(Received(topic, payload))


@pytest.mark.parametrize(
    "field,value",
    [("local_epochs", 1000), ("batch_size", 10**7), ("max_samples", 2**40), ("deadline_s", 1e9)],
)
def test_a_task_beyond_the_schemas_maxima_is_refused_before_anything_is_fetched(
    tmp_path: Path, field: str, value: Any
) -> None:
    # Prepare: a forged task, encoded without validation
    daemon, fake = _daemon(tmp_path)
    payload = msgspec.msgpack.encode(_task(**{field: value}))
    started = time.monotonic()
    # Execute
    _deliver(daemon, topics.task(RUN, DEV), payload)
    # Assert: one protocol failure naming the field, at once, and no chunk asked for
    replies = fake.messages(topics.RESULT)
    assert len(replies) == 1 and isinstance(replies[0], TaskFailed)
    assert replies[0].code == "protocol" and field in replies[0].reason, replies[0].reason
    assert not fake.messages(topics.REQ)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "total,chunk,why",
    [(2**45, 1, "n_chunks"), (64 << 30, 1 << 20, "total_bytes"), (8 << 30, 1 << 20, "budget")],
)
def test_a_task_whose_manifest_declares_huge_sizes_fails_with_a_reason_and_allocates_nothing(
    tmp_path: Path, total: int, chunk: int, why: str
) -> None:
    # Prepare: the artifact's manifest claims 2^45 chunks; 64 GiB; 8 GiB (within the schema, over the budget)
    daemon, fake = _daemon(tmp_path)
    payload = msgspec.msgpack.encode(_task(artifact=_ref("a-huge", "artifact", total=total, chunk=chunk)))
    # Execute
    tracemalloc.start()
    try:
        _deliver(daemon, topics.task(RUN, DEV), payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert
    replies = fake.messages(topics.RESULT)
    assert len(replies) == 1 and isinstance(replies[0], TaskFailed)
    assert replies[0].code == "protocol" and why in replies[0].reason, replies[0]
    assert not fake.messages(topics.REQ)
    assert peak < 16 << 20


def test_a_refusal_after_the_welcome_does_not_stop_an_admitted_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the device was welcomed; then someone re-registers under its id with another backend
    daemon, fake = _daemon(tmp_path)
    ctl = topics.ctl(RUN, DEV)
    _deliver(daemon, ctl, encode(Welcome(run_id=RUN, device_id=DEV, accepted=True)))
    refusal = Welcome(run_id=RUN, device_id=DEV, accepted=False, reason="run needs backend 'ort', device has ['x']")
    # Execute
    with caplog.at_level(logging.WARNING):
        _deliver(daemon, ctl, encode(refusal))
    # Assert: it keeps serving, says why in its log
    assert not daemon._stop.is_set()
    assert daemon.exit_code == ExitCode.STOPPED
    assert any("refus" in r.getMessage() and "backend" in r.getMessage() for r in caplog.records)


def test_a_refusal_before_any_welcome_still_ends_the_daemon(tmp_path: Path) -> None:
    # Prepare
    daemon, _ = _daemon(tmp_path)
    refusal = Welcome(run_id=RUN, device_id=DEV, accepted=False, reason="budget too small")
    # Execute
    _deliver(daemon, topics.ctl(RUN, DEV), encode(refusal))
    # Assert
    assert daemon._stop.is_set() and daemon.exit_code == ExitCode.REFUSED


def test_sigterm_while_a_transfer_stalls_abandons_the_task_at_once(tmp_path: Path) -> None:
    # Prepare: a task whose artifact never comes (its sender is gone), a long stall window, and a
    # SIGTERM (its handler sets the daemon's stop) while the daemon waits for the chunks.
    daemon, fake = _daemon(tmp_path)
    daemon.config = dataclasses.replace(daemon.config, stall_s=30.0)
    task = _task()
    threading.Timer(0.3, daemon.stop).start()
    started = time.monotonic()
    # Execute
    _deliver(daemon, topics.task(RUN, DEV), encode(task))
    # Assert: abandoned within a poll of the stop, not after 4 stall windows: no reply, nothing recorded
    assert time.monotonic() - started < 3.0
    assert fake.messages(topics.REQ) and not fake.messages(topics.RESULT)
    assert not daemon.ledger.handled(task.key)


# ---------------------------------------------------------------- SIGTERM while training


class _SlowBackend:
    """The real backend, 50 ms slower per step: training lasts long enough to be interrupted."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.kind = inner.kind
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def train_step(self, x: Any, y: Any, lr: float) -> float:
        time.sleep(0.05)
        self.steps += 1
        return float(self._inner.train_step(x, y, lr))


def test_sigterm_while_training_stops_at_the_next_step_and_exits_cleanly(
    mosquitto: Any,
    case: Any,
    exported: Callable[..., CachedArtifact],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a device with a shard, a 200-step task (50 ms a step), its transfers published before it
    made = trainer.make_backend
    backends: list[_SlowBackend] = []

    def slow(kind: str, **kw: Any) -> Any:
        backends.append(_SlowBackend(made(kind, **kw)))
        return backends[-1]

    monkeypatch.setattr(trainer, "make_backend", slow)
    x, y = random_batch(case.model, 4 * case.batch, np.random.default_rng(0))
    write_shard(tmp_path / "shard", x, y, {"name": "sigterm", "task": "classification"})
    config = DeviceConfig(
        device_id=DEV,
        run_id=RUN,
        broker=mosquitto.url,
        data_dir=tmp_path / "shard",
        state_dir=tmp_path / "state",
        memory_budget_bytes=4 << 30,
        heartbeat_s=0.2,
    )
    daemon = Daemon(config)
    blob = pack_artifact(exported(ArtifactKind.ORT).path)
    weights = pack_weights(random_weights(case.model, case.widths, seed=2))
    artifact_ref, weights_ref = make_manifest("a-sig", "artifact", blob), make_manifest("w-sig", "weights", weights)
    task = _task(
        artifact=artifact_ref,
        weights=weights_ref,
        units={g: list(range(w)) for g, w in case.widths.items()},
        tensor_axes=tensor_axes(model_spec(case.model)),
        local_epochs=50,
        batch_size=case.batch,
    )
    probe = MqttTransport("probe-sigterm", mosquitto.host, mosquitto.port)
    probe.connect()
    probe.subscribe(topics.result(RUN, DEV))
    signalled: list[float] = []

    def coordinator() -> None:
        deadline = time.monotonic() + 60
        while not daemon.transport.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        for ref, data in ((artifact_ref, blob), (weights_ref, weights)):
            for chunk in iter_chunks(ref, data):
                probe.publish(topics.bulk(RUN, DEV, ref.transfer_id), encode(chunk))
        probe.publish(topics.task(RUN, DEV), encode(task))
        while not (backends and backends[-1].steps >= 5) and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    helper = threading.Thread(target=coordinator, daemon=True)
    helper.start()
    try:
        # Execute
        code = daemon.run()
        ended = time.monotonic()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        helper.join(10)
    results = []
    while (event := probe.get(0.5)) is not None:
        if isinstance(event, Received) and event.payload:
            results.append(decode(event.payload))
    probe.close()
    # Assert: out within a few steps of the signal, exit code 0, no reply, nothing recorded for the task
    assert signalled, "training never started"
    assert code == ExitCode.STOPPED
    assert ended - signalled[0] < 3.0, f"{backends[-1].steps} steps, {ended - signalled[0]:.1f} s after SIGTERM"
    assert backends[-1].steps < 50
    assert not [r for r in results if isinstance(r, (SliceResult, TaskFailed))]
    assert not daemon.ledger.handled(task.key)


def test_chunk_requests_for_the_devices_slice_are_served_a_bounded_number_of_times(tmp_path: Path) -> None:
    # Prepare: the device holds an uploaded slice of 4 chunks; someone asks for all of it 300 times
    from msfusion.edge_runtime.daemon import _Upload
    from msfusion.wire.bulk import BulkSender

    daemon, fake = _daemon(tmp_path)
    data = bytes(range(256)) * 16
    ref = make_manifest("s-up", "slice", data, chunk_bytes=1024)
    daemon._upload = _Upload(BulkSender(fake, topics.up(RUN, DEV, ref.transfer_id), ref, data))
    ask = ChunkRequest(run_id=RUN, device_id=DEV, transfer_id=ref.transfer_id, missing=[0, 1, 2, 3])
    # Execute
    for _ in range(300):
        _deliver(daemon, topics.upreq(RUN, DEV), encode(ask))
    # Assert: a few copies at most
    sent = sum(len(p) for t, p, _ in fake.published if topics.parse(t).kind == topics.UP)
    assert sent <= 5 * len(data), sent


# ---------------------------------------------------------------- a coordinator killed before its first checkpoint


def test_a_fresh_session_never_trains_against_a_killed_sessions_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the ledger holds the slice this device trained for a session that was killed before it
    # checkpointed; the coordinator starts afresh (a new session), whose round 0 names no negative
    from msfusion.edge_runtime import daemon as daemon_module
    from msfusion.edge_runtime.trainer import TaskOutcome

    daemon, _ = _daemon(tmp_path)
    killed = _task(task_id="dead0000-r0-a0")
    stale = pack_weights({"w": np.ones((2, 2), np.float32)})
    daemon.ledger.record(killed.key, b"reply", stale, {"g": [0, 1]}, {})
    assert daemon.ledger.previous_slice() is not None  # the newest slice: what a task used to get
    negatives: list[Any] = []

    def train(task: TrainTask, io: Any, previous: Any, *args: Any, **kwargs: Any) -> TaskOutcome:
        negatives.append(previous)
        failed = TaskFailed(
            run_id=RUN, round_idx=task.round_idx, device_id=DEV, task_id=task.task_id, code="data", reason="x"
        )
        return TaskOutcome(failed, None)

    monkeypatch.setattr(daemon_module, "train_task", train)
    # Execute
    _deliver(daemon, topics.task(RUN, DEV), encode(_task(task_id="fresh000-r0-a0")))
    # Assert: it trains against the global sub-model, as the reference engine's round 0 does
    assert negatives == [None]


# ---------------------------------------------------------------- found in review: nesting, old stops


def test_a_deeply_nested_payload_on_the_task_topic_gets_a_reason_not_a_crash(tmp_path: Path) -> None:
    # Prepare: 200,000 nested arrays: past Python's recursion limit in any decoder
    daemon, fake = _daemon(tmp_path)
    # Execute
    _deliver(daemon, topics.task(RUN, DEV), b"\x91" * 200_000 + b"\xc0")
    # Assert: one protocol failure for an unknown task; the daemon is still serving
    replies = fake.messages(topics.RESULT)
    assert len(replies) == 1 and isinstance(replies[0], TaskFailed) and replies[0].code == "protocol"
    assert replies[0].task_id == "malformed" and not daemon._stop.is_set()


def test_a_signed_stop_ends_only_the_session_that_admitted_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from msfusion.wire.protocol import RunControl
    from msfusion.wire.signing import generate_signing_key

    # Prepare: a device holding the coordinator's key; a stop signed for an older session, a welcome
    # from session "new", then a stop for another device, and the right stop.
    signer = generate_signing_key(tmp_path / "task.key", tmp_path / "task.pub")
    daemon, _ = _daemon(tmp_path, task_signing_public_key=str(tmp_path / "task.pub"))
    ctl = topics.ctl(RUN, DEV)

    def stop(session: str, device: str = DEV) -> bytes:
        return encode(signer.sign(RunControl(run_id=RUN, device_id=device, command="stop", session=session)))

    # Execute / Assert
    with caplog.at_level(logging.WARNING):
        _deliver(daemon, ctl, stop("old"))  # queued from the last run, before this one's welcome
        _deliver(daemon, ctl, encode(signer.sign(Welcome(run_id=RUN, device_id=DEV, accepted=True, session="new"))))
        _deliver(daemon, ctl, stop("old"))
        _deliver(daemon, ctl, stop("new", device="dev001"))
    assert not daemon._stop.is_set()
    assert sum("dropped a stop of coordinator session 'old'" in r.getMessage() for r in caplog.records) == 2
    assert any("dropped a RunControl for hostile/dev001" in r.getMessage() for r in caplog.records)
    _deliver(daemon, ctl, stop("new"))
    assert daemon._stop.is_set() and daemon.exit_code == ExitCode.STOPPED
