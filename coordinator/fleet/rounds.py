"""One round over the fleet, top to bottom: plan, export, slice, send, collect, merge, evaluate, adapt, checkpoint.

`run_round` reproduces `ReferenceEngine.run_round` over MQTT: the same plan
(devices in id order), the same per-device seeds (`msfusion.recipe.device_seed`), the
same batches (the devices use `msfusion.algorithm.batches`) and the same merge.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from msfusion.algorithm.inference import CoHoldStats
from msfusion.algorithm.merging import MergeAccumulator, MergeReport, SliceUpdate
from msfusion.algorithm.overlap import next_overlap
from msfusion.algorithm.planning import effective_ratios, plan_round
from msfusion.algorithm.slicing import Weights, slice_weights
from msfusion.algorithm.spec import IndexArray, ModelSpec
from msfusion.coordinator.fleet.checkpoint import (
    RunState,
    save_checkpoint,
    weights_digest,
)
from msfusion.coordinator.fleet.config import RoundConfig
from msfusion.coordinator.fleet.link import (
    CoordinatorLink,
    Inbound,
    Malformed,
    SliceArrived,
)
from msfusion.coordinator.fleet.registry import Fleet
from msfusion.data.datasets import ArrayDataset
from msfusion.errors import ArtifactError, InvalidSlice, ProtocolError
from msfusion.models.evaluate import evaluate
from msfusion.models.registry import input_scales
from msfusion.recipe import EngineConfig, device_seed
from msfusion.wire.bulk import make_manifest, slice_transfer_id, transfer_id
from msfusion.wire.codec import Codec, check_codec, check_like, pack, unpack
from msfusion.wire.protocol import (
    AxisUnits,
    BulkRef,
    Heartbeat,
    Preprocessing,
    Registration,
    SliceResult,
    TaskFailed,
    TrainTask,
)
from msfusion.wire.transport import ConnectionChanged
from msfusion.wire.weights import nbytes

log = logging.getLogger(__name__)

# A trained slice packs the sub-model's tensors again: its header may differ from the sent one's by a little.
SLICE_HEADER_SLACK_BYTES = 64 << 10
STALL_CHECK_S = 0.25  # how often a round looks for stalled slice uploads


class ArtifactSource(Protocol):
    """Training artifacts by sub-model shape: exported once, then reused from the cache."""

    def get(self, widths: Mapping[str, int], kind: str = "") -> tuple[BulkRef, bytes]:
        """The artifact bundle of `kind` ("": the run's backend) for a sub-model at `widths` and its manifest."""
        ...


@dataclass
class RoundContext:
    """What every round needs; built once per run.

    Attributes:
        run_id: the run.
        backend: the artifact kind devices train.
        engine: the algorithm's knobs (the reference engine's).
        round: per-round knobs.
        spec: the global model's spec.
        fleet: registrations and liveness.
        link: the wire.
        artifacts: training artifacts by sub-model shape.
        test: held-out data.
        checkpoint_dir: where each merged round is checkpointed.
        cohold: how merged slices held every scaled weight (the co-hold weighted model's counts; None: not kept).
        preprocessing: how devices turn their raw data into the model's inputs (None: as stored), sent in every task.
        on_tick: called about twice a second while collecting (progress displays).
        late: asynchronous rounds (`round.asynchronous`): the tasks still out when their round
            closed, by device; such a device is left out of the plans until its slice comes (merged
            into the round then open, with the staleness weight) or is given up on.
    """

    run_id: str
    backend: str
    engine: EngineConfig
    round: RoundConfig
    spec: ModelSpec
    fleet: Fleet
    link: CoordinatorLink
    artifacts: ArtifactSource
    test: ArrayDataset
    checkpoint_dir: Path
    cohold: CoHoldStats | None = None
    preprocessing: Preprocessing | None = None
    on_tick: Callable[[int, Mapping[str, str]], None] | None = None
    late: dict[str, _Sent] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """What one attempt at a round did (one line of metrics.jsonl)."""

    round_idx: int
    attempt: int
    merged: bool
    overlap: float
    devices: tuple[str, ...]
    replies: dict[str, str]  # device -> "merged" | "rejected: ..." | "failed: ..." | "no reply"
    metrics: dict[str, float] = field(default_factory=dict)
    disagreement: float | None = None
    coverage: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    slice_bytes: dict[str, int] = field(default_factory=dict)  # fp32 size of each device's slice
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    budget_bytes: dict[str, int] = field(default_factory=dict)  # each device's memory budget as registered
    step_time_s: dict[str, float] = field(default_factory=dict)  # each device's reported time per training step
    width_ratios: dict[str, float] = field(default_factory=dict)  # the ratio each device trained at
    backends: dict[str, str] = field(default_factory=dict)  # the artifact kind each device trained
    start_sha256: str = ""  # weights_digest of the global weights the round started from
    end_sha256: str = ""  # ... and of the merged weights (empty when not merged)
    clipped: dict[str, str] = field(default_factory=dict)  # device -> why its update was scaled to the norm bound
    update_norms: dict[str, float] = field(default_factory=dict)  # RMS of (returned - sent) of each valid slice
    # Asynchronous rounds: device -> what became of a late task's slice this round ("merged: round 3, 1 late,
    # weight x0.707", "rejected: ...", "failed: ...", "given up: ...", "pending: ...": still training).
    late: dict[str, str] = field(default_factory=dict)
    reply_s: dict[str, float] = field(default_factory=dict)  # device -> seconds from its task sent to its reply


def tensor_axes(spec: ModelSpec) -> dict[str, list[AxisUnits]]:
    """Per tensor, its split axes as the wire carries them."""
    return {
        name: [AxisUnits(axis=axis, group=group, unit_size=size) for axis, (group, size) in sorted(axes.items())]
        for name in spec.shapes
        if (axes := spec.sliced_axes(name))
    }


def make_task(
    ctx: RoundContext,
    round_idx: int,
    task_id: str,
    device_id: str,
    index: int,
    units: Mapping[str, IndexArray],
    artifact: BulkRef,
    weights: BulkRef,
    negative_task_id: str = "",
    codec: Codec = "fp32",
) -> TrainTask:
    """The task telling one device what to train this round.

    `negative_task_id`: whose slice is its negative; `codec`: how `weights` is encoded and the slice
    must come back (`task_codec`: the run's, if the device decodes it).
    """
    cfg = ctx.engine
    return TrainTask(
        run_id=ctx.run_id,
        round_idx=round_idx,
        device_id=device_id,
        task_id=task_id,
        backend=ctx.fleet.backend_of(device_id),  # the run's backend, or the one chosen for the device
        artifact=artifact,
        weights=weights,
        units={group: [int(u) for u in us] for group, us in units.items()},
        tensor_axes=tensor_axes(ctx.spec),
        local_epochs=cfg.local.epochs,
        batch_size=cfg.local.batch_size,
        lr=cfg.local.lr,
        max_samples=cfg.local.max_samples,
        mu=cfg.loss.mu,
        tau=cfg.loss.tau,
        contrastive=cfg.loss.variant.value,
        optimizer=cfg.local.optimizer.name,
        seed=device_seed(cfg.seed, round_idx, index),
        deadline_s=ctx.round.task_deadline_s(cfg.merge.max_staleness),
        preprocessing=ctx.preprocessing,
        negative_task_id=negative_task_id,
        codec=codec,
    )


def task_codec(ctx: RoundContext, device_id: str) -> Codec:
    """The run's codec (`[engine] codec`) if the device lists it in `Capacity.codecs`, else fp32."""
    codec = check_codec(ctx.engine.codec)
    record = ctx.fleet.devices.get(device_id)
    return codec if record is not None and codec in record.codecs else "fp32"


@dataclass
class _Sent:
    """A task as sent, with what it takes to resend it and to merge its reply."""

    task: TrainTask
    weights: bytes  # the global sub-model, packed in the task's codec
    units: Mapping[str, IndexArray]
    fp32_bytes: int  # the slice's raw size, the yardstick for bytes on the wire
    width_ratio: float  # the ratio the device trains at (a memory failure caps it below this)
    exact: Weights | None = None  # a compressed task's exact sub-model: its slice is an update of this
    sent_at: float = 0.0  # time.monotonic() when its task went out
    base: Weights | None = None  # a late task's sub-model as cut (its slice's update starts there)


def _as_late(item: _Sent) -> _Sent:
    """A task still out when its round closed, with the exact sub-model it was cut from kept for its late slice."""
    return replace(item, base=item.exact if item.exact is not None else unpack(item.weights, "fp32", update=False))


def _expire_late(ctx: RoundContext, round_idx: int) -> dict[str, str]:
    """Give up on late tasks too old to merge into round `round_idx`; returns the notes for the outcome."""
    notes = {}
    limit = ctx.engine.merge.max_staleness
    for device_id, item in list(ctx.late.items()):
        if round_idx - item.task.round_idx > limit:
            notes[device_id] = f"given up: its slice of round {item.task.round_idx} would be over {limit} rounds late"
            ctx.fleet.note_failure(device_id, notes[device_id])
            ctx.link.withdraw(item.task.weights.transfer_id)
            del ctx.late[device_id]
    return notes


def handle_fleet_message(ctx: RoundContext, inbound: Inbound, now: float) -> None:
    """Registrations (answered with a Welcome) and heartbeats, in and between rounds."""
    msg = inbound.message
    if isinstance(msg, Registration):
        welcome = ctx.fleet.register(msg, now)
        # Not waiting for the PUBACK: thousands registering at once would each cost a round trip (and a
        # broker slow to ack would stall the loop); a device not welcomed registers again (daemon.py).
        ctx.link.send(inbound.device_id, welcome, wait=False)
    elif isinstance(msg, Heartbeat):
        ctx.fleet.heartbeat(msg, now)
    else:
        ctx.fleet.seen(inbound.device_id, now)


def run_round(
    ctx: RoundContext, weights: Weights, state: RunState, attempt: int
) -> tuple[RoundOutcome, Weights, RunState]:
    """Run one attempt at round `state.next_round`.

    Args:
        ctx: the run's context.
        weights: the global weights before the round.
        state: the run state before the round.
        attempt: 0 for the first try of this round.

    Returns:
        The outcome, and the new weights and state; when the round fell below
        quorum (`outcome.merged` is False) they are the inputs, unchanged.

    Raises:
        ConfigError: no device to plan for.
    """
    round_idx = state.next_round
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    # Plan (the core): devices in id order, as the reference engine orders them.
    # The overlap target adapts here, from the last merge's disagreement, exactly as in the reference engine.
    overlap = next_overlap(ctx.engine.overlap, round_idx, state.overlap, state.disagreement)
    late_notes = _expire_late(ctx, round_idx)
    devices = [d for d in ctx.fleet.participants(time.monotonic()) if d.device_id not in ctx.late]
    plan = plan_round(ctx.spec, devices, round_idx, overlap, ctx.engine.plan)
    # The ratio each device trains at (msfusion may plan one below what the device affords).
    ratios = {
        d.device_id: float(r) for d, r in zip(devices, effective_ratios(devices, overlap, ctx.engine.plan.strategy))
    }
    lap("plan_s")

    # Export or reuse: one artifact per distinct sub-model shape and backend.
    artifacts: dict[tuple[str, tuple[tuple[str, int], ...]], tuple[BulkRef, bytes]] = {}
    for device in devices:
        widths = plan.widths(device.device_id)
        shape = (ctx.fleet.backend_of(device.device_id), tuple(sorted(widths.items())))
        if shape not in artifacts:
            artifacts[shape] = ctx.artifacts.get(widths, shape[0])
            ctx.link.offer(*artifacts[shape])
    lap("export_s")

    # Slice and pack each device's global sub-model.
    task_id = f"{state.session}-r{round_idx}-a{attempt}"
    sent: dict[str, _Sent] = {}
    for index, device in enumerate(devices):
        units = plan.units(device.device_id)
        sub = slice_weights(weights, ctx.spec, units)  # (K*u, ...) -> (k*u, ...) per grouped axis
        codec = task_codec(ctx, device.device_id)
        packed = pack(sub, codec)  # fp32: the weights; fp16 / int8: their rounding (the update comes back)
        manifest = make_manifest(transfer_id("w", task_id, device.device_id), "weights", packed)
        shape = (ctx.fleet.backend_of(device.device_id), tuple(sorted(plan.widths(device.device_id).items())))
        artifact = artifacts[shape][0]
        # Its negative: its slice merged in the last merged round, never one of a discarded attempt.
        negative = state.negatives.get(device.device_id, "")
        task = make_task(ctx, round_idx, task_id, device.device_id, index, units, artifact, manifest, negative, codec)
        exact = sub if codec != "fp32" else None
        sent[device.device_id] = _Sent(task, packed, units, nbytes(sub), ratios[device.device_id], exact)
    lap("slice_s")

    # Send.
    max_late = ctx.engine.merge.max_staleness
    for item in sent.values():
        item.sent_at = time.monotonic()
    down_before = dict(ctx.link.bytes_down)
    up_before = dict(ctx.link.bytes_up)
    ctx.link.send_tasks((item.task, item.weights) for item in sent.values())
    lap("publish_s")

    # Collect until all are in or the deadline, validating each slice as it arrives and merging it then
    # (collect_s includes those streamed merges; merge_s counts them again, with the final pass). With the
    # update-norm bound on (the default) the valid slices are kept until collection ends instead, since the
    # bound is relative to the round's median: memory is then the sum of the slice sizes.
    accumulator = MergeAccumulator(weights, ctx.spec, round_idx, ctx.engine.merge)
    arrivals: dict[str, float] = {}
    late_merged: dict[str, _Sent] = {}
    replies, results, merge_s = _collect(
        ctx, sent, accumulator, time.monotonic() + ctx.round.deadline_s, arrivals, late_notes, late_merged
    )
    lap("collect_s")
    if ctx.round.asynchronous:  # still training: its slice is merged into a later round if it comes in time
        for device_id, item in sent.items():
            if replies[device_id] == "no reply":
                ctx.late[device_id] = _as_late(item)
                note = f"pending: merged into a later round, at most {max_late} rounds late"
                late_notes[device_id] = f"{late_notes[device_id]}; {note}" if device_id in late_notes else note
    for item in sent.values():
        if item.task.device_id not in ctx.late:
            ctx.link.withdraw(item.task.weights.transfer_id)

    outcome = RoundOutcome(
        round_idx=round_idx,
        attempt=attempt,
        merged=False,
        overlap=plan.overlap,
        devices=tuple(sent),
        replies=replies,
        bytes_down={d: ctx.link.bytes_down[d] - down_before.get(d, 0) for d in sent},
        bytes_up={d: ctx.link.bytes_up[d] - up_before.get(d, 0) for d in sent},
        slice_bytes={d: item.fp32_bytes for d, item in sent.items()},
        peak_rss_bytes={d: r.peak_rss_bytes for d, r in results.items()},
        budget_bytes={d: ctx.fleet.devices[d].memory_budget_bytes for d in sent if d in ctx.fleet.devices},
        step_time_s={d: r.step_time_s for d, r in results.items()},
        width_ratios={d: item.width_ratio for d, item in sent.items()},
        backends={d: item.task.backend for d, item in sent.items()},
        timings_s=timings,
        start_sha256=weights_digest(weights),
        late=late_notes,
        reply_s=arrivals,
    )

    # Merge what arrived, if enough did; a round below quorum is retried, not merged.
    # The update-norm bound compares the round's slices with each other, so it refuses or clips here.
    clock = time.perf_counter()
    new_weights, report = accumulator.result()
    _screened(ctx, replies, report)
    for device_id in [d for d in late_merged if d not in report.merged]:  # refused by the round's norm bound
        outcome.late[device_id] = f"rejected: {report.rejected.get(device_id, 'by the merge')}"
        del late_merged[device_id]
    outcome.clipped, outcome.update_norms = dict(report.clipped), dict(report.update_norms)
    merged = [d for d, reply in replies.items() if reply == "merged"]
    needed = max(1, int(np.ceil(ctx.round.quorum * len(sent))))
    if len(merged) < needed:
        log.warning(
            "round %d attempt %d: %d of %d slices, quorum %d: not merged",
            round_idx,
            attempt,
            len(merged),
            len(sent),
            needed,
        )
        for device_id in late_merged:
            outcome.late[device_id] = "lost: its round was not merged"
        return outcome, weights, state
    if ctx.cohold is not None:  # what the merged slices held, for the co-hold weighted model
        for device_id in merged:
            ctx.cohold.add(sent[device_id].units, input_scales(ctx.engine.model, plan.widths(device_id)))
        for item in late_merged.values():
            widths = {group: len(units) for group, units in item.units.items()}
            ctx.cohold.add(item.units, input_scales(ctx.engine.model, widths))
    lap("merge_s")
    timings["merge_s"] += merge_s

    # Evaluate the global model on held-out data.
    outcome.metrics = evaluate(ctx.engine.model, new_weights, ctx.test, ctx.engine.eval_batch_size)
    lap("eval_s")

    # The next round adapts the overlap from this one's target and measured disagreement.
    # Each device whose slice was merged trains against that slice next (the others keep their last one).
    negatives = {
        **state.negatives,
        **{d: item.task.task_id for d, item in late_merged.items()},
        **{d: sent[d].task.task_id for d in merged},
    }
    next_state = replace(
        state, next_round=round_idx + 1, overlap=overlap, disagreement=report.disagreement, negatives=negatives
    )

    # Checkpoint: weights and state, so --resume continues bit for bit.
    save_checkpoint(ctx.checkpoint_dir, new_weights, next_state, ctx.cohold.state() if ctx.cohold else None)
    lap("checkpoint_s")

    outcome.merged = True
    outcome.end_sha256 = weights_digest(new_weights)
    outcome.disagreement = report.disagreement
    outcome.coverage = report.coverage
    return outcome, new_weights, next_state


def _collect(
    ctx: RoundContext,
    sent: Mapping[str, _Sent],
    accumulator: MergeAccumulator,
    deadline: float,
    arrivals: dict[str, float],
    late_notes: dict[str, str],
    late_merged: dict[str, _Sent],
) -> tuple[dict[str, str], dict[str, SliceResult], float]:
    """Handle events until every device replied or the deadline passed.

    Late tasks (`ctx.late`, asynchronous rounds) are answered for on the side: a late slice that
    comes is merged into this round's accumulator (its staleness weight is the merge's) and its
    device leaves `ctx.late` (into `late_merged` when merged), with a note in `late_notes`.

    Returns:
        Per device its reply ("merged", "rejected: ...", "failed: ...", or
        "no reply"), the result each slice came with (its peak RSS and step time), and the seconds
        spent merging; `arrivals` gets, per slice that arrived (a late one's too), the seconds since its task went out.
    """
    replies: dict[str, str] = {}
    rejected: dict[str, str] = {}  # the last refused reply of a device whose slot stays open (the reply if none comes)
    results: dict[str, SliceResult] = {}
    late = ctx.late
    late_replies: dict[str, str] = {}  # late tasks answer here, never in `replies`
    late_rejected: dict[str, str] = {}
    merge_s = 0.0
    last_tick = 0.0
    last_stall_check = 0.0

    def settle_late() -> None:  # a late task answered: it leaves ctx.late, its note says how
        for device_id, reply in late_replies.items():
            item = late.pop(device_id, None)
            if item is None:
                continue
            ctx.link.withdraw(item.task.weights.transfer_id)
            if reply == "merged":
                late_merged[device_id] = item
                s = accumulator_round - item.task.round_idx
                weight = ctx.engine.merge.staleness_weight(s)
                reply = f"merged: its slice of round {item.task.round_idx}, {s} late, weight x{weight:.3g}"
            late_notes[device_id] = reply
        late_replies.clear()

    accumulator_round = next(iter(sent.values())).task.round_idx if sent else 0
    while len(replies) < len(sent) and (now := time.monotonic()) < deadline:
        if ctx.on_tick is not None and now - last_tick >= 0.5:
            ctx.on_tick(accumulator_round, replies)
            last_tick = now
        if now - last_stall_check >= STALL_CHECK_S:  # O(slices in flight): not after every message
            last_stall_check = now
            for stalled in ctx.link.request_stalled():
                device_id = stalled.device_id
                if device_id in sent and device_id not in replies:
                    _refuse(ctx, sent[device_id], replies, rejected, stalled, "slice transfer incomplete", "failed")
                elif device_id in late:
                    _refuse(
                        ctx,
                        late[device_id],
                        late_replies,
                        late_rejected,
                        stalled,
                        "slice transfer incomplete",
                        "failed",
                    )
        match ctx.link.poll(min(0.5, deadline - now)):
            case None:
                pass
            case ConnectionChanged(connected=True):  # after a broker outage: tasks or replies may be lost
                _resend(ctx, sent, [d for d in sent if d not in replies])
            case ConnectionChanged():
                pass
            case Malformed(device_id=device_id):
                ctx.fleet.seen(device_id, time.monotonic())
            case SliceArrived() as arrived if arrived.device_id in sent and arrived.device_id not in replies:
                merge_s += _take_slice(ctx, sent, accumulator, replies, rejected, results, arrived, arrivals)
            case SliceArrived() as arrived if arrived.device_id in late:
                merge_s += _take_slice(ctx, late, accumulator, late_replies, late_rejected, {}, arrived, arrivals)
            case SliceArrived():
                pass  # a slice already answered for
            case Inbound(message=SliceResult() | TaskFailed()) as inbound if inbound.device_id in late:
                _on_reply(ctx, late, late_replies, late_rejected, inbound)
            case Inbound(message=SliceResult() | TaskFailed()) as inbound:
                _on_reply(ctx, sent, replies, rejected, inbound)
            case Inbound() as inbound:
                # A fresh registration means a new connection: the device restarted (whatever it held of
                # its task is gone) or reconnected (its reply may have died with the old connection; a
                # daemon answers a task it already handled with the same reply, without training again).
                came_back = isinstance(inbound.message, Registration) and not inbound.retained
                handle_fleet_message(ctx, inbound, time.monotonic())
                if came_back and inbound.device_id in sent and inbound.device_id not in replies:
                    _resend(ctx, sent, [inbound.device_id])
                elif came_back and inbound.device_id in late:
                    _resend(ctx, late, [inbound.device_id])
        if late_replies:
            settle_late()
    for arrived in ctx.link.take_ready():  # complete as the deadline passed: as good as any other
        if arrived.device_id in sent and arrived.device_id not in replies:
            merge_s += _take_slice(ctx, sent, accumulator, replies, rejected, results, arrived, arrivals)
        elif arrived.device_id in late:
            merge_s += _take_slice(ctx, late, accumulator, late_replies, late_rejected, {}, arrived, arrivals)
    settle_late()
    # Asynchronous rounds: the uploads of late tasks, and of this round's unanswered ones, go on.
    ctx.link.forget_slices(keep=set(late) | {d for d in sent if d not in replies} if ctx.round.asynchronous else ())
    for device_id in sent:
        if device_id not in replies and not ctx.round.asynchronous:
            ctx.fleet.note_failure(device_id, rejected.get(device_id, "no reply before the round's deadline"))
    return {d: replies.get(d) or rejected.get(d, "no reply") for d in sent}, results, merge_s


def _take_slice(
    ctx: RoundContext,
    sent: Mapping[str, _Sent],
    accumulator: MergeAccumulator,
    replies: dict[str, str],
    rejected: dict[str, str],
    results: dict[str, SliceResult],
    arrived: SliceArrived,
    arrivals: dict[str, float],
) -> float:
    """Merge one arrived slice (or refuse it with the reason); returns the seconds spent merging."""
    started = time.perf_counter()
    item = sent[arrived.device_id]
    arrivals[arrived.device_id] = time.monotonic() - item.sent_at
    verdict = _merge_slice(accumulator, item, arrived)
    if verdict == "merged":
        replies[arrived.device_id] = verdict
        results[arrived.device_id] = arrived.result
    else:
        _refuse(ctx, item, replies, rejected, arrived.result, verdict.removeprefix("rejected: "))
        if arrived.device_id in replies:  # its own slice: its figures are the device's
            results[arrived.device_id] = arrived.result
    return time.perf_counter() - started


def _refuse(
    ctx: RoundContext,
    item: _Sent,
    replies: dict[str, str],
    rejected: dict[str, str],
    result: SliceResult,
    reason: str,
    verdict: str = "rejected",
) -> None:
    """A refused result or slice. It answers for its device only when it came as the device's own upload.

    A device's daemon sends one slice per task, under the transfer id it derives from the task
    (`bulk.slice_transfer_id`). A refused one under any other id is someone else's (any client can
    publish on a device's topics when the broker has no ACL), so the device's slot stays open for
    its own slice until the deadline; the refusal is its reply only if nothing better comes.
    """
    device_id = result.device_id
    rejected[device_id] = f"{verdict}: {reason}"
    own = slice_transfer_id(item.task.task_id, device_id)
    if result.weights.transfer_id == own:
        replies[device_id] = rejected[device_id]
        ctx.fleet.note_failure(device_id, rejected[device_id])
        return
    log.warning(
        "%s the reply of %s under transfer %s (its own is %s): %s; its slot stays open",
        verdict,
        device_id,
        result.weights.transfer_id,
        own,
        reason,
    )


def _resend(ctx: RoundContext, sent: Mapping[str, _Sent], device_ids: Sequence[str]) -> None:
    for device_id in device_ids:
        item = sent[device_id]
        log.info("sending task %s to %s again", item.task.task_id, device_id)
        ctx.link.send_task(item.task, item.weights)


def _on_reply(
    ctx: RoundContext, sent: Mapping[str, _Sent], replies: dict[str, str], rejected: dict[str, str], inbound: Inbound
) -> None:
    """A device's reply: a failure is recorded; a result starts its slice's transfer (merged on `SliceArrived`).

    A result is judged before any of its slice is received: a manifest larger than the planned
    sub-model packs to, or more samples than the task allows, refuses it with the reason.
    """
    msg = inbound.message
    assert isinstance(msg, (SliceResult, TaskFailed))
    device_id = inbound.device_id
    ctx.fleet.seen(device_id, time.monotonic())
    item = sent.get(device_id)
    if item is None or msg.key != item.task.key:
        log.info("dropped a stale %s from %s for task %s", type(msg).__name__, device_id, msg.task_id)
        return
    if device_id in replies:
        return  # a redelivered reply: handled once
    if isinstance(msg, SliceResult):
        why = _result_refusal(ctx, item, msg)
        if why is not None:
            log.warning("rejected the result of %s: %s", device_id, why)
            _refuse(ctx, item, replies, rejected, msg, why)
            return
        ctx.link.expect_slice(msg)
        return
    if msg.code in ("bad_signature", "protocol"):
        # The device could not verify or decode something on its task topic. That need not be our
        # task (with no ACL anyone may publish there, and the device answers for it), so its slot stays
        # open: the genuine task's slice may still come; if not, the deadline closes it.
        log.warning("%s could not take a task message (%s): %s", device_id, msg.code, msg.reason)
        ctx.fleet.note_failure(device_id, f"{msg.code}: {msg.reason}")
        return
    replies[device_id] = f"failed: {msg.code}: {msg.reason}"
    ctx.fleet.note_failure(device_id, f"{msg.code}: {msg.reason}")
    if msg.code == "memory_budget":
        ctx.fleet.memory_exceeded(device_id, item.width_ratio)  # a narrower width from the next round on


def _result_refusal(ctx: RoundContext, item: _Sent, result: SliceResult) -> str | None:
    """Why a result is refused before its slice is fetched (None: it may come).

    Its manifest may not declare more bytes than the sub-model the device was sent (a trained
    slice holds the same tensors, or fewer, in the task's codec: a compressed update packs like the
    weights it updates) and its sample count, the merge weight, not exceed
    what the task allows: its `max_samples`, and the samples the device registered.
    """
    manifest = result.weights
    if manifest.kind != "slice":
        return f"its transfer {manifest.transfer_id} is of kind {manifest.kind!r}, not a slice"
    limit = len(item.weights) + SLICE_HEADER_SLACK_BYTES
    if manifest.total_bytes > limit:
        return (
            f"its slice declares {manifest.total_bytes} bytes; the sub-model it was sent packs to "
            f"{len(item.weights)} bytes"
        )
    bounds = []
    if item.task.max_samples > 0:
        bounds.append((item.task.max_samples, "the task's max_samples"))
    if (data := ctx.fleet.data.get(result.device_id)) is not None:
        bounds.append((data.n_samples, "the samples it registered"))
    for bound, what in bounds:
        if result.n_samples > bound:
            return f"n_samples {result.n_samples} over {what} ({bound})"
    return None


def _screened(ctx: RoundContext, replies: dict[str, str], report: MergeReport) -> None:
    """Slices valid on arrival but refused by the round-wide update-norm bound become rejected replies."""
    for device_id, reason in report.rejected.items():
        if replies.get(device_id) == "merged" and device_id not in report.merged:
            log.warning("rejected the slice of %s: %s", device_id, reason)
            replies[device_id] = f"rejected: {reason}"
            ctx.fleet.note_failure(device_id, replies[device_id])
    for device_id, reason in report.clipped.items():
        log.warning("clipped the update of %s: %s", device_id, reason)


def _merge_slice(accumulator: MergeAccumulator, item: _Sent, arrived: SliceArrived) -> str:
    """Validate one slice and fold it in (or keep it for the norm bound); a bad slice is rejected, changes nothing.

    A compressed task's slice is the rounded update: it is added to the exact sub-model that was cut.
    """
    try:
        trained = unpack(arrived.payload, item.task.codec, update=item.exact is not None)
        if item.exact is not None:
            check_like(trained, item.exact)
            trained = {name: item.exact[name] + update for name, update in trained.items()}
        accumulator.add(
            SliceUpdate(
                arrived.device_id, item.task.round_idx, item.units, trained, arrived.result.n_samples, base=item.base
            )
        )
    except (ArtifactError, InvalidSlice, ProtocolError) as exc:
        log.warning("rejected the slice of %s: %s", arrived.device_id, exc)
        return f"rejected: {exc}"
    return "merged"
