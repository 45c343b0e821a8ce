"""A whole coordinator run: connect, wait for the fleet, run every round (retrying below quorum), report.

`run_coordinator` is what `msfusion coordinator run` and `msfusion simulate`
call. It never prints: progress goes to an optional `RunProgress`, figures to
the output folder (metrics.jsonl, summary.json, model.safetensors, accuracy.png).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import msgspec
import numpy as np

from msfusion.algorithm.inference import CoHoldStats, choose_deployable
from msfusion.algorithm.slicing import Weights
from msfusion.algorithm.spec import widths_for_ratio
from msfusion.atomic import atomic_write
from msfusion.coordinator.fleet import report, run_report
from msfusion.coordinator.fleet.checkpoint import RunState, load_checkpoint, load_cohold
from msfusion.coordinator.fleet.config import CoordinatorConfig
from msfusion.coordinator.fleet.events import RunEvents
from msfusion.coordinator.fleet.link import CoordinatorLink, Inbound
from msfusion.coordinator.fleet.registry import Fleet, Sizing
from msfusion.coordinator.fleet.rounds import (
    ArtifactSource,
    RoundContext,
    RoundOutcome,
    handle_fleet_message,
    run_round,
)
from msfusion.coordinator.security import ResultKeys, SecurityDir
from msfusion.data.datasets import ArrayDataset
from msfusion.data.sources import DataSpec, Source, check_report, combine_reports, materialize, open_source
from msfusion.errors import ConfigError, DataError, DeviceLost, MsfusionError
from msfusion.models.config import ModelConfig
from msfusion.models.evaluate import evaluate
from msfusion.models.registry import build_model, input_scales, model_spec, state_to_numpy
from msfusion.wire.protocol import Preprocessing, RunControl
from msfusion.wire.signing import MessageSigner, ResultAuthenticator
from msfusion.wire.transport import MqttTransport
from msfusion.wire.weights import pack_weights

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
DRAIN_EVENTS = 2000  # while waiting for devices, queued events handled between two counts of the fleet
ANSWERED_GRACE_S = 5.0  # with too few admitted and the rest refused, how long nothing new must arrive before giving up


class RunProgress(Protocol):
    """Where a run reports progress (the CLI shows it with rich)."""

    def waiting(self, registered: int, needed: int) -> None: ...

    def tick(self, round_idx: int, devices: Mapping[str, str], replies: Mapping[str, str]) -> None: ...

    def round_done(self, outcome: RoundOutcome) -> None: ...


class NotEnoughDevices(DeviceLost):
    """Fewer live devices than `fleet.min_devices` within `fleet.wait_s`."""


class RoundFailed(MsfusionError):
    """A round stayed below quorum after every attempt."""


class RunStopped(MsfusionError):
    """`msfusion runs stop` asked this run to stop (after the round in progress)."""


class _Watch:
    """The run's progress as events (fleet snapshots at most once a second), passed on to a display."""

    def __init__(self, inner: RunProgress | None, events: RunEvents, fleet: Fleet, every_s: float = 1.0) -> None:
        self._inner, self._events, self._fleet, self._every_s = inner, events, fleet, every_s
        self._last = 0.0

    def snapshot(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._every_s:
            self._last = now
            online = {d: self._fleet.online(d, now) for d in self._fleet.devices}
            self._events.fleet(self._fleet.devices, online, self._fleet.excluded)

    def waiting(self, registered: int, needed: int) -> None:
        self.snapshot()
        if (why := self._events.stop_requested()) is not None:
            raise RunStopped(why)
        if self._inner is not None:
            self._inner.waiting(registered, needed)

    def tick(self, round_idx: int, devices: Mapping[str, str], replies: Mapping[str, str]) -> None:
        if self._inner is not None:
            self._inner.tick(round_idx, devices, replies)

    def round_done(self, outcome: RoundOutcome) -> None:
        self.snapshot(force=True)
        if self._inner is not None:
            self._inner.round_done(outcome)


PREPROCESSING_FILE = "preprocessing.json"


def open_eval_data(path: Path | None, model: ModelConfig) -> Source:
    """The held-out data the global model is evaluated on, in any format `data/sources.py` reads.

    Raises:
        ConfigError: no eval data configured.
        DataError: unreadable, or not data the model takes.
    """
    if path is None:
        raise ConfigError("no eval_shard configured (held-out data: a shard from `msfusion partition`, or any format)")
    source = open_source(DataSpec(path, channels=model.in_channels, image_size=model.image_size))
    if why := check_report(source.report(), model.inputs()):
        raise DataError(f"the evaluation data {path} cannot test the model: {why}")
    return source


def load_eval_data(path: Path | None, model: ModelConfig, prep: Preprocessing | None = None) -> ArrayDataset:
    """The held-out data read whole, as the model takes it under the run's preprocessing."""
    return materialize(open_eval_data(path, model), prep)


def agree_preprocessing(config: CoordinatorConfig, fleet: Fleet) -> Preprocessing | None:
    """The run's preprocessing: pinned values, the rest from the admitted devices' data reports.

    None when no device reported its data and nothing is pinned (data is used as stored).
    """
    pinned = config.data.pinned()
    reports = [fleet.data[d] for d in sorted(fleet.data)]
    if not reports and pinned == Preprocessing():
        return None
    prep = combine_reports(reports, config.engine.model.inputs(), pinned)
    log.info(
        "preprocessing from %d devices' data: %s",
        len(reports),
        {k: v for k, v in msgspec.structs.asdict(prep).items() if v},
    )
    return prep


def save_preprocessing(checkpoint_dir: Path, prep: Preprocessing | None) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(checkpoint_dir / PREPROCESSING_FILE, msgspec.json.encode(prep))


def load_preprocessing(checkpoint_dir: Path) -> tuple[bool, Preprocessing | None]:
    """(found, preprocessing) saved by the run being resumed."""
    path = checkpoint_dir / PREPROCESSING_FILE
    if not path.is_file():
        return False, None
    try:
        return True, msgspec.json.decode(path.read_bytes(), type=Preprocessing | None)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path} is corrupt: {exc}") from exc


def choose_model(
    config: CoordinatorConfig,
    variants: Mapping[str, Weights],
    test: ArrayDataset | None,
    prep: Preprocessing | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The deployable variant (on the validation shard; merged without one) and every variant's figures."""
    model, batch = config.engine.model, config.engine.eval_batch_size
    scored: dict[str, dict[str, Any]] = {name: {} for name in variants}
    if test is not None:
        for name, w in variants.items():
            scored[name]["test"] = evaluate(model, w, test, batch)
    if config.validation_shard is None:
        return "merged", scored
    validation = load_eval_data(config.validation_shard, model, prep)
    checked = {name: evaluate(model, w, validation, batch) for name, w in variants.items()}
    for name, figures in checked.items():
        scored[name]["validation"] = figures
    return choose_deployable(checked), scored


def initial_state(config: CoordinatorConfig, resume: bool) -> tuple[Weights, RunState]:
    """Fresh weights and state (seeded as the reference engine seeds them), or the last checkpoint."""
    if resume:
        weights, state = load_checkpoint(config.out / CHECKPOINT_DIR)
        if state.run_id != config.run_id or state.backend != config.backend:
            raise ConfigError(
                f"checkpoint is of run {state.run_id}/{state.backend}, config says {config.run_id}/{config.backend}"
            )
        log.info("resuming %s at round %d", state.run_id, state.next_round)
        return weights, state
    weights = state_to_numpy(build_model(config.engine.model, seed=config.engine.seed))
    # The session id only names tasks (so a resumed run re-asks the same questions); no number depends on it.
    state = RunState(
        run_id=config.run_id,
        session=secrets.token_hex(4),
        next_round=0,
        overlap=config.engine.overlap.initial,
        disagreement=None,
        backend=config.backend,
    )
    return weights, state


def run_sizing(config: CoordinatorConfig) -> Sizing:
    """How devices that register with a profile are sized for this run's model and batch size."""
    from msfusion.coordinator.fleet.artifacts import profile_key
    from msfusion.coordinator.fleet.sizing import model_sizes

    engine = config.engine
    return Sizing(
        model_sizes(engine.model),
        profile_key(engine),
        engine.local.batch_size,
        config.fleet.memory_margin,
    )


def wait_for_devices(ctx: RoundContext, needed: int, wait_s: float, progress: RunProgress | None) -> None:
    """Handle registrations and heartbeats until `needed` devices are live.

    Devices left out for their data count towards `needed` (they registered; the run goes on
    without them), but at least one device must be live. Devices refused for anything else (a
    budget too small, another backend) do not count: once every expected device has answered
    (live + refused >= needed, no admitted device offline, nothing new for `ANSWERED_GRACE_S`, so
    that boards still booting can register) and too few are live, waiting longer cannot help.

    Raises:
        NotEnoughDevices: not within `wait_s`, or at once when every expected device has answered
            and too few were admitted; the message gives each refusal's reason.
    """
    deadline = time.monotonic() + wait_s
    quiet_since = time.monotonic()
    fleet = ctx.fleet

    def live() -> int:
        return fleet.count_online(time.monotonic())

    def short() -> bool:
        n = live()
        return n < 1 or n + len(fleet.excluded) < needed

    while short():
        if progress is not None:
            progress.waiting(live(), needed)
        event = ctx.link.poll(0.5)
        heard = event is not None
        # Everything already queued is handled before the fleet is counted again: counting is O(devices),
        # and thousands of devices register within seconds of each other.
        handled = 0
        while isinstance(event, Inbound) and handled < DRAIN_EVENTS:
            handle_fleet_message(ctx, event, time.monotonic())
            handled += 1
            event = ctx.link.poll(0)
        if not short():
            break
        # The refused include those left out for their data; an admitted device gone quiet may come back;
        # and a board still booting may register yet: nothing new for ANSWERED_GRACE_S first.
        if heard:
            quiet_since = time.monotonic()
        answered = (
            time.monotonic() - quiet_since >= min(ANSWERED_GRACE_S, wait_s)
            and live() == len(fleet.devices)
            and live() + len(fleet.refused) >= needed
        )
        if answered or time.monotonic() > deadline:
            by_reason: dict[str, list[str]] = {}
            for device_id, why in sorted(fleet.refused.items()):
                by_reason.setdefault(why, []).append(device_id)
            refusals = "; ".join(f"{', '.join(ids)}: {why}" for why, ids in by_reason.items())
            refused = f"; {len(fleet.refused)} refused ({refusals})" if fleet.refused else ""
            when = "and every expected device has answered" if answered else f"after {wait_s:.0f} s"
            raise NotEnoughDevices(f"{live()} of {needed} devices online {when}{refused}")


def connect_securely(
    config: CoordinatorConfig,
) -> tuple[MqttTransport, MessageSigner | None, Mapping[str, ResultAuthenticator] | None]:
    """The coordinator's broker connection, its task signer and the devices' result keys.

    With a security folder: mutual TLS under the coordinator's certificate, its task-signing key
    and every enrolled device's result key. Without one: the configured credentials, the
    `task_signing_key` if any, and unauthenticated results.

    Raises:
        ConfigError: an unreadable security folder or key.
        BrokerUnavailable: the broker cannot be reached.
    """
    options: dict[str, Any] = {"username": config.username, "password": config.password, "protocol": config.mqtt}
    signing_key = config.task_signing_key
    results: Mapping[str, ResultAuthenticator] | None = None
    if config.security is not None:
        security = SecurityDir(config.security)
        options.update(security.coordinator_credentials().transport_options())
        signing_key = signing_key or security.task_signing_key
        results = ResultKeys(security)  # re-read on a miss: a device enrolled mid-run gets in
    # A round publishes to every device at once (link.send_tasks): more in flight than a device needs.
    transport = MqttTransport.from_url(f"coordinator-{config.run_id}", config.broker, max_inflight=100, **options)
    signer = MessageSigner.from_file(signing_key) if signing_key is not None else None
    transport.connect()
    return transport, signer, results


def run_coordinator(
    config: CoordinatorConfig,
    artifacts: ArtifactSource,
    resume: bool = False,
    progress: RunProgress | None = None,
    stop_devices: bool = True,
    on_events: Callable[[RunEvents], None] | None = None,
) -> report.RunSummary:
    """Train `config.engine.rounds` rounds over the fleet and write every output.

    Args:
        config: the run's configuration.
        artifacts: training artifacts by sub-model shape (export + cache).
        resume: continue from the checkpoint in `config.out`.
        progress: optional progress display.
        stop_devices: tell every device to stop at the end.
        on_events: called with the run's event stream once it exists (the dashboard subscribes so).

    Returns:
        The run's summary (also written to summary.json).

    Raises:
        ConfigError: bad config or nothing to resume.
        BrokerUnavailable: the broker cannot be reached.
    """
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / report.METRICS_FILE).unlink(missing_ok=True)
    eval_source = open_eval_data(config.eval_shard, config.engine.model)  # fails before connecting
    spec = model_spec(config.engine.model)
    weights, state = initial_state(config, resume)
    transport, signer, results = connect_securely(config)
    link = CoordinatorLink(
        transport, config.run_id, stall_s=config.round.stall_s, signer=signer, results=results, session=state.session
    )
    link.subscribe()
    fleet = Fleet(
        spec,
        config.run_id,
        config.backend,
        config.fleet.heartbeat_timeout_s,
        run_sizing(config),
        inputs=config.engine.model.inputs(),
        backends=config.backends,
    )

    events = RunEvents(out)
    events.clear_stop()  # a stop request is for the run it was made to, not for its resumption
    events.emit(
        "run_started",
        run_id=config.run_id,
        pid=os.getpid(),
        strategy=config.engine.plan.strategy.value,
        model=config.engine.model.arch,
        rounds=config.engine.rounds,
        params=spec.param_count(),
        backend=config.backend,
        out=str(out),
        min_devices=config.fleet.min_devices,
        resumed=resume,
    )
    if on_events is not None:
        on_events(events)
    watch = _Watch(progress, events, fleet)
    progress = watch

    def tick(round_idx: int, replies: Mapping[str, str]) -> None:
        watch.snapshot()
        if progress is not None:
            snapshot = {d: s for d, s, _ in fleet.snapshot(time.monotonic())}
            progress.tick(round_idx, snapshot, replies)

    cohold = CoHoldStats(spec, list(input_scales(config.engine.model, None)))
    if resume and (saved := load_cohold(out / CHECKPOINT_DIR)) is not None:
        cohold.load_state(saved)
    ctx = RoundContext(
        run_id=config.run_id,
        backend=config.backend,
        engine=config.engine,
        round=config.round,
        spec=spec,
        fleet=fleet,
        link=link,
        artifacts=artifacts,
        test=ArrayDataset(np.zeros((0,)), np.zeros((0,))),  # read once the run's preprocessing is agreed
        checkpoint_dir=out / CHECKPOINT_DIR,
        cohold=cohold,
        on_tick=tick,
    )
    ok, reason, stopped = True, "", False
    agreed, prep = load_preprocessing(out / CHECKPOINT_DIR) if resume else (False, None)
    test: ArrayDataset | None = None
    try:
        while state.next_round < config.engine.rounds:
            for attempt in range(config.round.max_attempts):
                wait_for_devices(ctx, config.fleet.min_devices, config.fleet.wait_s, progress)
                if not agreed:  # once per run, from the devices admitted by the first round; checkpointed
                    prep, agreed = agree_preprocessing(config, fleet), True
                    save_preprocessing(out / CHECKPOINT_DIR, prep)
                if test is None:
                    test = materialize(eval_source, prep)
                    ctx.test, ctx.preprocessing = test, prep
                started = time.perf_counter()
                outcome, weights, state = run_round(ctx, weights, state, attempt)
                line = report.append_metrics(out, outcome, time.perf_counter() - started)
                events.emit("round", **line)
                if progress is not None:
                    progress.round_done(outcome)
                if outcome.merged and (why := events.stop_requested()) is not None:
                    raise RunStopped(why)
                if outcome.merged:
                    break
            else:
                raise RoundFailed(
                    f"round {state.next_round} stayed below quorum in {config.round.max_attempts} attempts"
                )
    except RunStopped as exc:
        ok, reason, stopped = False, f"stopped: {exc}", True
        log.warning("run stopped on request (%s) after round %d; --resume continues it", exc, state.next_round)
    except (NotEnoughDevices, RoundFailed, DataError) as exc:
        ok, reason = False, str(exc)
        log.error("run failed: %s", exc)
    finally:
        if stop_devices:
            for device_id in sorted(fleet.devices):
                try:
                    link.send(
                        device_id,
                        RunControl(
                            run_id=config.run_id, device_id=device_id, command="stop", reason=reason or "run finished"
                        ),
                    )
                except MsfusionError as exc:
                    log.warning("could not tell %s to stop: %s", device_id, exc)
            # Nothing of the run stays on the broker: the devices clear their own topics when told to stop,
            # this clears those of devices that are gone (their last will) or never heard it.
            link.clear_retained()
        transport.close()
    if test is None and agreed:
        test = materialize(eval_source, prep)
    summary = finish(
        config, weights, ok, reason, cohold, test, prep, dict(fleet.excluded), stopped, refused=dict(fleet.refused)
    )
    watch.snapshot(force=True)
    events.emit(
        "run_finished",
        ok=summary.ok,
        state=summary.state,
        reason=summary.reason,
        rounds_done=summary.rounds,
        final_metrics=dict(summary.final_metrics),
        deployable=summary.deployable,
    )
    events.clear_stop()
    events.close()
    return summary


def finish(
    config: CoordinatorConfig,
    weights: Weights,
    ok: bool,
    reason: str,
    cohold: CoHoldStats | None = None,
    test: ArrayDataset | None = None,
    prep: Preprocessing | None = None,
    excluded: Mapping[str, str] | None = None,
    stopped: bool = False,
    refused: Mapping[str, str] | None = None,
) -> report.RunSummary:
    """Write the deployable model, plot and summary.json; return the summary.

    The model written is the deployable variant (merged or co-hold weighted),
    chosen on `validation_shard` when the run has one; the merged weights are
    also kept as `model-merged.safetensors` when they are not the one chosen.
    """
    out = config.out
    spec = model_spec(config.engine.model)
    variants = {"merged": weights}
    if cohold is not None:
        variants["expected"] = cohold.expected_weights(weights)
    deployable, scored = choose_model(config, variants, test, prep)
    atomic_write(out / report.MODEL_FILE, pack_weights(variants[deployable]))
    if deployable != "merged":
        atomic_write(out / report.MERGED_MODEL_FILE, pack_weights(weights))
    else:
        (out / report.MERGED_MODEL_FILE).unlink(missing_ok=True)  # an older run's, in the same folder
    lines = report.read_metrics(out)
    plot = report.plot_accuracy(out, lines)
    merged = [line for line in lines if line["merged"]]
    paths = {
        "model": str(out / report.MODEL_FILE),
        "metrics": str(out / report.METRICS_FILE),
        "summary": str(out / report.SUMMARY_FILE),
        "checkpoint": str(out / CHECKPOINT_DIR),
    }
    if plot is not None:
        paths["plot"] = str(plot)
    if (out / "logs").is_dir():
        paths["logs"] = str(out / "logs")
    paths["report"] = str(out / run_report.REPORT_FILE)
    summary = report.RunSummary(
        ok=ok,
        reason=reason,
        strategy=config.engine.plan.strategy.value,
        rounds=len(merged),
        final_metrics=merged[-1]["metrics"] if merged else {},
        history=report.history(lines),
        devices=report.device_totals(lines, lambda r: spec.param_count(widths_for_ratio(spec, r))),
        # Then the refusals that stood at the end ("device: refused: reason"; those left out for their data
        # are in `excluded`), last so that a display of the last few failures shows them.
        failures=report.failures(lines)
        + [f"{d}: refused: {why}" for d, why in sorted((refused or {}).items()) if d not in (excluded or {})],
        paths=paths,
        model_params=spec.param_count(),
        deployable=deployable,
        variant_metrics=scored,
        excluded=dict(excluded or {}),
        state="finished" if ok else "stopped" if stopped else "failed",
        preprocessing={k: v for k, v in msgspec.structs.asdict(prep).items() if v} if prep is not None else {},
    )
    report.write_summary(out, summary)
    run_report.write_report(out, config=config)  # after the summary: a report failure loses no figure
    return summary
