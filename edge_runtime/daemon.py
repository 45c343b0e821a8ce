"""The device daemon: connect, register, take tasks, answer each exactly once (torch-free).

One thread reads broker events and runs tasks (`trainer.train_task`); a
second only publishes heartbeats, so the coordinator sees the device alive
during long local training. The broker publishes a retained "offline"
heartbeat (the last will) if the daemon dies. Replies are idempotent per
(run, round, device, task): the `Ledger` on disk remembers handled tasks and
the last reply, which a redelivered task gets again, byte for byte.
"""

from __future__ import annotations

import enum
import logging
import platform
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec
import psutil

from msfusion import __version__
from msfusion.data.sources import Source, open_source
from msfusion.edge_runtime.config import DeviceConfig, data_spec
from msfusion.edge_runtime.ledger import Ledger, StoredReply
from msfusion.edge_runtime.memory import release_memory
from msfusion.edge_runtime.profiling import PROFILE_FILE, load_profile
from msfusion.edge_runtime.trainer import TaskOutcome, TrainingStopped, train_task, warm_up
from msfusion.errors import ArtifactError, ConfigError, DataError, MsfusionError, ProtocolError
from msfusion.wire import topics
from msfusion.wire.bulk import BulkSender, TransferIncomplete, receive
from msfusion.wire.codec import CODECS
from msfusion.wire.protocol import (
    ID_PATTERN,
    BulkRef,
    Capacity,
    Chunk,
    ChunkRequest,
    DataReport,
    DeviceState,
    FailureCode,
    Heartbeat,
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
from msfusion.wire.signing import MessageVerifier, R, ResultAuthenticator
from msfusion.wire.transport import (
    BrokerUnavailable,
    ConnectionChanged,
    MqttTransport,
    Received,
)

log = logging.getLogger(__name__)

REGISTER_RETRY_S = 5.0  # re-register until welcomed (the coordinator may start after us)
EARLY_CHUNK_BYTES = 32 << 20  # chunks that arrive before their task are kept up to this


class ExitCode(enum.IntEnum):
    """The daemon's exit codes."""

    STOPPED = 0  # told to stop, or SIGTERM / SIGINT
    INTERNAL = 1
    CONFIG = 2  # bad config, or the broker refused our credentials
    REFUSED = 3  # the coordinator refused the registration


class HeartbeatThread(threading.Thread):
    """Publishes this device's state every `interval_s`, and at once when it changes."""

    def __init__(self, transport: MqttTransport, run_id: str, device_id: str, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._transport = transport
        self._topic = topics.status(run_id, device_id)
        self._run_id = run_id
        self._device_id = device_id
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._state: DeviceState = "idle"
        self._task_id: str | None = None
        self._progress = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()  # not `_stop`: a Thread method join() calls

    def set(self, state: DeviceState, task_id: str | None = None, progress: float = 0.0) -> None:
        with self._lock:
            changed = state != self._state
            self._state, self._task_id, self._progress = state, task_id, min(1.0, max(0.0, progress))
        if changed:
            self._wake.set()

    def progress(self, share: float) -> None:
        with self._lock:
            self._progress = min(1.0, max(0.0, share))

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            with self._lock:
                beat = Heartbeat(
                    run_id=self._run_id,
                    device_id=self._device_id,
                    state=self._state,
                    sent_at=time.time(),
                    task_id=self._task_id,
                    progress=self._progress,
                )
            if not self._transport.connected:
                continue
            try:
                self._transport.publish_nowait(self._topic, encode(beat), retain=True)
            except MsfusionError as exc:
                log.debug("heartbeat not sent: %s", exc)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()


def offline_beat(run_id: str, device_id: str) -> bytes:
    """The retained heartbeat that says this device is gone (last will and clean exit)."""
    data: bytes = encode(Heartbeat(run_id=run_id, device_id=device_id, state="offline", sent_at=time.time()))
    return data


def _probe_ids(payload: bytes) -> tuple[int, str]:
    """Best-effort (round, task id) of a task that failed validation, for its TaskFailed."""
    import re

    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nesting deeper than Python's limit
        return 0, "malformed"
    if not isinstance(raw, dict):
        return 0, "malformed"
    round_idx = raw.get("round_idx")
    task_id = raw.get("task_id")
    round_ok = isinstance(round_idx, int) and not isinstance(round_idx, bool) and 0 <= round_idx < 2**63
    task_ok = isinstance(task_id, str) and re.match(ID_PATTERN, task_id)
    return (round_idx if round_ok else 0), (task_id if task_ok else "malformed")  # type: ignore[return-value]


@dataclass
class _Upload:
    """The last slice sent, kept to serve the coordinator's chunk requests."""

    sender: BulkSender


class Daemon:
    """One device's daemon.

    Args:
        config: the device's config.
    """

    publish_timeout_s = 10.0  # for a request or reply's PUBACK (a host of many synthetic devices waits longer)
    upload_timeout_s = 30.0  # for each PUBACK of a slice's chunks

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.ledger = Ledger(config.state_dir)
        self.transport = MqttTransport.from_url(
            f"device-{config.run_id}-{config.device_id}",
            config.broker,
            **config.transport_options(),
            will=(topics.status(config.run_id, config.device_id), offline_beat(config.run_id, config.device_id), True),
            keepalive_s=config.keepalive_s,
        )
        self.beat = HeartbeatThread(self.transport, config.run_id, config.device_id, config.heartbeat_s)
        self._stop = threading.Event()
        self._welcomed = False
        self._run_over = False  # the coordinator said stop: the run is over, nothing of it stays retained
        self._last_register = 0.0
        self._upload: _Upload | None = None
        self._early: OrderedDict[str, list[Received]] = OrderedDict()  # transfer id -> chunks before their task
        self._early_bytes = 0
        self._profile = self._load_profile()
        self.source: Source | None = None
        self._data_report: DataReport | None = None
        self._verifier = (
            MessageVerifier.from_pem(config.task_signing_public_key) if config.task_signing_public_key else None
        )
        self._sealer = ResultAuthenticator.from_text(config.result_key) if config.result_key else None
        self._session: str | None = None  # the coordinator session of the last accepted welcome
        if self._verifier is None and (config.tls_cert or config.result_key):
            log.warning(
                "no task_signing_public_key: this device obeys unsigned tasks, welcomes and stops; "
                "give it the coordinator's key (`msfusion devices flash --security`)"
            )
        self._newest_round: dict[str, int] = {}  # per coordinator session: an older round's task is a replay
        self.exit_code: ExitCode = ExitCode.STOPPED

    def _open_data(self) -> DataReport:
        """Open the device's data and compute what registration reports of it (a problem is reported, not raised)."""
        spec = data_spec(self.config)
        try:
            self.source = open_source(spec)
            report = self.source.report()
        except DataError as exc:
            log.error("cannot use the data in %s: %s", spec.path, exc)
            self.source = None
            return DataReport(format=spec.format, task="classification", n_samples=0, sample_shape=[], fatal=str(exc))
        for problem in report.problems:
            log.warning("data: %s", problem)
        if report.fatal:
            log.error("data: %s", report.fatal)
        else:
            log.info("data: %d samples of %s (%s)", report.n_samples, report.task, report.format)
        return report

    def _load_profile(self) -> ProfileReport | None:
        """The profile `msfusion-device profile` saved in the state folder (None: none, or unreadable)."""
        path = self.config.state_dir / PROFILE_FILE
        try:
            profile = load_profile(path)
        except ProtocolError as exc:
            log.warning("ignoring the profile in %s: %s", path, exc)
            return None
        if profile is None:
            log.info("no profile in %s: the coordinator sizes this device from its budget alone", path)
            return None
        log.info("registering with the profile in %s (%d points)", path, len(profile.entries))
        # The same board under another id or run: the measurements still hold.
        return msgspec.structs.replace(profile, run_id=self.config.run_id, device_id=self.config.device_id)

    # Lifecycle.

    def run(self) -> ExitCode:
        """Serve until told to stop; returns an `ExitCode`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: self._stop.set())
        self._data_report = self._open_data()
        try:
            self._warm_up()
            self._connect()
        except (ConfigError, ArtifactError) as exc:
            log.error("%s", exc)
            return ExitCode.CONFIG
        for topic_filter in topics.device_filters(self.config.run_id, self.config.device_id):
            self.transport.subscribe(topic_filter)
        self.beat.start()
        self._last_register = time.monotonic()  # the connect event registers; retries start after REGISTER_RETRY_S
        try:
            while not self._stop.is_set():
                if not self._welcomed and time.monotonic() - self._last_register > REGISTER_RETRY_S:
                    self._register()
                event = self.transport.get(0.5)
                if event is not None:
                    try:
                        self._handle(event)
                    except Exception:  # a message must never take the daemon down: log it and go on
                        log.exception("could not handle a message on %s", getattr(event, "topic", "?"))
        finally:
            self.beat.stop()
            self.beat.join(timeout=2)  # its last beat must not land after the goodbye
            self._leave()
            self.transport.close()
        return self.exit_code

    def _leave(self) -> None:
        """Say goodbye on the status topic: "offline", or, once the run is over, nothing retained at all.

        Told to stop by the coordinator, the run is over: this device deletes its retained
        registration and status (empty retained messages), so the broker keeps nothing of the
        run. Stopped otherwise (SIGTERM), the run goes on: an "offline" status stays retained.
        """
        cfg = self.config
        goodbye = [(topics.status(cfg.run_id, cfg.device_id), offline_beat(cfg.run_id, cfg.device_id))]
        if self._run_over:
            goodbye = [
                (topics.register(cfg.run_id, cfg.device_id), b""),
                (topics.status(cfg.run_id, cfg.device_id), b""),
            ]
        for topic, payload in goodbye:
            try:
                self.transport.publish(topic, payload, retain=True, timeout_s=2)
            except MsfusionError:
                return  # the broker is gone; our last will says "offline"

    def stop(self) -> None:
        self._stop.set()

    def _connect(self) -> None:
        """Connect, retrying with exponential backoff (paho keeps reconnecting after that)."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.transport.connect(timeout_s=10)
                log.info("connected to %s as %s", self.config.broker, self.config.device_id)
                return
            except BrokerUnavailable as exc:
                log.warning("%s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _register(self) -> None:
        cfg = self.config
        capacity = Capacity(
            memory_budget_bytes=cfg.memory_budget_bytes,
            cores=psutil.cpu_count(logical=True) or 1,
            arch=platform.machine() or "unknown",
            backends=list(cfg.backends),
            max_width_ratio=cfg.max_width_ratio,
            board=cfg.board,
            codecs=list(CODECS),  # every transfer codec decodes here (`wire/codec.py`)
            pinned_backend=cfg.backend,
            device="cuda" if cfg.device == "cuda" else "cpu",
        )
        msg = Registration(
            run_id=cfg.run_id,
            device_id=cfg.device_id,
            capacity=capacity,
            runtime_version=__version__,
            profile=self._profile,
            data=self._data_report,
        )
        self._last_register = time.monotonic()
        try:
            # Retained: a coordinator that starts (or restarts) later still sees it.
            self.transport.publish(topics.register(cfg.run_id, cfg.device_id), encode(msg), retain=True)
        except MsfusionError as exc:
            log.warning("registration not sent: %s", exc)

    # Events.

    def _handle(self, event: Any) -> None:
        if isinstance(event, ConnectionChanged):
            log.info("connection %s (%s)", "up" if event.connected else "down", event.reason)
            if event.connected:
                self._register()
            return
        if not isinstance(event, Received):
            return
        try:
            where = topics.parse(event.topic)
        except ProtocolError as exc:
            log.warning("ignored a message on %s: %s", event.topic, exc)
            return
        try:
            msg = decode(event.payload)
        except ProtocolError as exc:
            log.warning("malformed message on %s: %s", event.topic, exc)
            if where.kind == topics.TASK:
                round_idx, task_id = _probe_ids(event.payload)
                self._send_failure_unrecorded(round_idx, task_id, "protocol", str(exc))
            return
        if isinstance(msg, (TrainTask, Welcome, RunControl)) and not self._trusted(msg, where.kind):
            return
        if isinstance(msg, TrainTask):
            self._on_task(msg)
        elif isinstance(msg, Welcome):
            self._on_welcome(msg)
        elif isinstance(msg, RunControl) and msg.command == "stop":
            log.info("told to stop: %s", msg.reason)
            self._run_over = True
            self._stop.set()
        elif isinstance(msg, ChunkRequest) and where.kind == topics.UPREQ:
            self._serve_upload(msg)
        elif isinstance(msg, Chunk) and where.kind == topics.BULK:
            self._keep_early(msg.transfer_id, event)

    def _on_welcome(self, msg: Welcome) -> None:
        """Welcomed: stop re-registering. Refused before any welcome: exit. Refused after one: keep serving.

        A refusal that comes after this device was admitted is not the answer to its
        registration (someone re-registered under its id, or a stale retained answer):
        it is logged, and the device keeps the place it was given.
        """
        if msg.accepted:
            self._welcomed = True
            self._session = msg.session
        elif self._welcomed:
            log.warning("ignored a refusal after this device was welcomed: %s", msg.reason)
        else:
            log.error("the coordinator refused this device: %s", msg.reason)
            self.exit_code = ExitCode.REFUSED
            self._stop.set()

    def _trusted(self, msg: TrainTask | Welcome | RunControl, kind: str) -> bool:
        """Whether a message that tells this device what to do is the coordinator's (see `wire/signing.py`).

        A task that fails verification on this device's own task topic gets a
        `TaskFailed(code="bad_signature")`: on a broker with the generated ACL
        only the coordinator can publish there, so a failure means a key or
        configuration mismatch the operator must see. A task for another
        device or run, a replay of an older round, and a forged `Welcome` or
        `RunControl` are dropped with a log line and no reply: answering would
        only tell an attacker what this device accepts.
        """
        cfg = self.config
        if msg.run_id != cfg.run_id or msg.device_id != cfg.device_id:
            log.warning(
                "dropped a %s for %s/%s (this is %s/%s)",
                type(msg).__name__,
                msg.run_id,
                msg.device_id,
                cfg.run_id,
                cfg.device_id,
            )
            return False
        if self._verifier is not None:
            try:
                self._verifier.verify(msg)
            except ProtocolError as exc:
                if isinstance(msg, TrainTask) and kind == topics.TASK:
                    log.error("refused task %s: %s", msg.task_id, exc)
                    self._send_failure_unrecorded(msg.round_idx, msg.task_id, "bad_signature", str(exc))
                else:
                    log.error("dropped a %s: %s", type(msg).__name__, exc)
                return False
            # A signed stop ends only the session that admitted this device: an old one, queued by the
            # broker for an offline device, must not end the next run.
            if isinstance(msg, RunControl) and (self._session is None or msg.session != self._session):
                log.warning("dropped a stop of coordinator session %r (admitted by %r)", msg.session, self._session)
                return False
        if isinstance(msg, TrainTask):
            session = msg.task_id.split("-", 1)[0]  # "<session>-r<round>-a<attempt>" (coordinator/fleet/rounds.py)
            newest = self._newest_round.get(session, -1)
            if msg.round_idx < newest:
                log.warning("dropped task %s: a replay of round %d (round %d seen)", msg.task_id, msg.round_idx, newest)
                return False
            self._newest_round[session] = msg.round_idx
        return True

    def _keep_early(self, transfer_id: str, event: Received) -> None:
        """A chunk with no task waiting for it: keep it (bounded) in case its task comes next."""
        self._early.setdefault(transfer_id, []).append(event)
        self._early_bytes += len(event.payload)
        while self._early_bytes > EARLY_CHUNK_BYTES and self._early:
            _, dropped = self._early.popitem(last=False)
            self._early_bytes -= sum(len(e.payload) for e in dropped)

    def _serve_upload(self, request: ChunkRequest) -> None:
        upload = self._upload
        if upload is None or upload.sender.manifest.transfer_id != request.transfer_id:
            log.warning("asked for chunks of %s, which this device no longer holds", request.transfer_id)
            return
        try:
            upload.sender.serve(request)
        except MsfusionError as exc:
            log.warning("could not serve %s: %s", request.transfer_id, exc)

    # Tasks.

    def fetch(self, manifest: BulkRef, pull: bool) -> bytes:
        """Receive one bulk transfer addressed to this device (pull: ask for every chunk first).

        Raises:
            TrainingStopped: the daemon is stopping (SIGTERM): the task is abandoned, not failed.
        """
        if self._stop.is_set():
            raise TrainingStopped("stopping: the task's transfers are not fetched")
        cfg = self.config
        topic = topics.bulk(cfg.run_id, cfg.device_id, manifest.transfer_id)
        early = self._early.pop(manifest.transfer_id, [])
        self._early_bytes -= sum(len(e.payload) for e in early)
        self.transport.put_back(early)

        def request(missing: list[int]) -> None:
            ask = ChunkRequest(
                run_id=cfg.run_id, device_id=cfg.device_id, transfer_id=manifest.transfer_id, missing=missing
            )
            self.transport.publish(topics.req(cfg.run_id, cfg.device_id), encode(ask), timeout_s=self.publish_timeout_s)

        try:
            payload: bytes = receive(
                self.transport,
                manifest,
                topic,
                cfg.stall_s,
                request_missing=request,
                retries=3,
                pull=pull and not early,
                stop=self._stop,
            )
        except TransferIncomplete:
            if self._stop.is_set():  # SIGTERM mid-transfer: stop now, not when the transfer times out
                raise TrainingStopped("stopping: the task's transfers are not fetched") from None
            raise
        return payload

    def _on_task(self, task: TrainTask) -> None:
        cfg = self.config
        if task.run_id != cfg.run_id or task.device_id != cfg.device_id:
            log.warning("ignored a task for %s/%s", task.run_id, task.device_id)
            return
        if self.ledger.handled(task.key):
            stored = self.ledger.last_reply()
            if stored is not None and stored.key == task.key:
                log.info("task %s was redelivered: sending the same reply again", task.task_id)
                self._send(stored)
            else:
                log.info("ignored stale redelivered task %s", task.task_id)
            return
        log.info("round %d: task %s", task.round_idx, task.task_id)
        self.beat.set("training", task.task_id)
        try:
            outcome = self._train(task)
        except TrainingStopped as exc:
            # SIGTERM: no reply and no record, so the task is trained afresh if it comes again.
            log.info("task %s abandoned: %s", task.task_id, exc)
            self.beat.set("idle")
            return
        if isinstance(outcome.reply, TaskFailed) and outcome.reply.code == "memory_budget":
            # The task's runtime is closed; hand its memory back before anything else runs.
            log.info("memory after the stopped task: %d MiB", release_memory() >> 20)
        stored = StoredReply(task.key, encode(self._seal(outcome.reply)), outcome.slice_bytes)
        # Recorded before it is sent: whatever happens next, this task's answer is this one.
        if isinstance(outcome.reply, SliceResult):
            self.ledger.record(
                task.key,
                stored.reply,
                outcome.slice_bytes,
                task.units,
                task.tensor_axes,
                task.negative_task_id,
                outcome.local,
            )
        else:
            self.ledger.record(task.key, stored.reply, keep_task_id=task.negative_task_id)
        if self.config.straggle_s > 0 and self._stop.wait(self.config.straggle_s):
            return  # stopped while straggling: the reply is recorded and is sent if the task comes again
        self.beat.set("uploading", task.task_id, 1.0)
        self._send(stored)
        self.beat.set("idle")

    def _warm_up(self) -> None:
        """Import the backends' runtimes before the first task (a synthetic device has none to import)."""
        warm_up(self.config.backends, self.config.device)

    def _train(self, task: TrainTask) -> TaskOutcome:
        """Train one task (a synthetic device, `edge_runtime/synthetic.py`, answers without training)."""
        # The negative is the slice the task names (its slice merged last), never merely our newest.
        previous = self.ledger.previous_slice(task.negative_task_id)
        # int8: what rounding took from that slice's update goes into this one (error feedback).
        residual = self.ledger.previous_residual(task.negative_task_id) if task.codec == "int8" else None
        return train_task(
            task, self, previous, self.config, self.beat.progress, self.source, stop=self._stop, residual=residual
        )

    def _send(self, stored: StoredReply) -> None:
        """Upload a slice's chunks (if any), then the reply message."""
        cfg = self.config
        try:
            reply = decode(stored.reply)
            if isinstance(reply, SliceResult) and stored.slice_bytes is not None:
                topic = topics.up(cfg.run_id, cfg.device_id, reply.weights.transfer_id)
                sender = BulkSender(self.transport, topic, reply.weights, stored.slice_bytes)
                self._upload = _Upload(sender)
                sender.send(timeout_s=self.upload_timeout_s)
            self.transport.publish(
                topics.result(cfg.run_id, cfg.device_id), stored.reply, timeout_s=self.publish_timeout_s
            )
        except MsfusionError as exc:
            # Not a failure of the task: the coordinator asks again (chunk request or redelivery).
            log.warning("reply not fully sent: %s", exc)

    def _send_failure_unrecorded(self, round_idx: int, task_id: str, code: FailureCode, reason: str) -> None:
        """A TaskFailed for a task that could not even be decoded (nothing to record it under)."""
        cfg = self.config
        failed = TaskFailed(
            run_id=cfg.run_id,
            round_idx=round_idx,
            device_id=cfg.device_id,
            task_id=task_id,
            code=code,
            reason=reason[:4000],
        )
        try:
            self.transport.publish(topics.result(cfg.run_id, cfg.device_id), encode(self._seal(failed)))
        except MsfusionError as exc:
            log.warning("failure reply not sent: %s", exc)

    def _seal(self, reply: R) -> R:
        """The reply with this device's MAC (`wire/signing.py`), when it has a result key."""
        return reply if self._sealer is None else self._sealer.seal(reply)
