"""Fleet state on the coordinator: registrations, liveness, and each device's width ratio.

One `DeviceRecord` per registered device, of fixed size: the fleet's state
grows with the number of devices, never with the number of rounds.

Width from a measured profile (`ratio_from_profile`): a device that ran
`msfusion-device profile` registers with the measured peak memory of a few
widths of the run's model. The coordinator fits `devices.memory_model` on them
(overhead + bytes per parameter + bytes per activation) and gives the device
the widest ratio whose predicted peak fits its budget less a safety margin
(`fleet.memory_margin`). The planner's capacity-aware double shifting keeps
coverage even across the mixed widths.

Backend per device (`choose_backend`): a board may run several backends
(`Capacity.backends`) and profile each (`ProfileEntry.backend`). Each
profiled backend the run allows gets its own memory model and widest ratio;
the device trains at the widest of those ratios (memory decides the
sub-model, never speed), with the fastest backend that fits it, by the step
time measured at the profiled width nearest that ratio. A backend pinned in
device.toml (`Capacity.pinned_backend`) is the only candidate. A device
without a usable profile trains the run's `backend` if it has it, else the
first of the run's backends it lists.

Width from memory budget alone (no profile, or one of another model): a
sub-model with P parameters costs about `BYTES_PER_PARAM` bytes per
parameter to train (fp32 weights, gradients, one optimizer moment, and the
frozen global and previous-local references of the contrastive term: 6 x 4
bytes), on top of a fixed `RUNTIME_BYTES` for the interpreter and the
training runtime (measured: a device daemon training with ONNX Runtime
peaks at about 400 MB RSS for a small CNN). A device with budget B affords the share
(B - RUNTIME_BYTES) / (BYTES_PER_PARAM * P_full) of the full model's
parameters, and gets the largest width ratio whose sub-model fits that share
(`spec.ratio_for_budget`), capped by the `max_width_ratio` it may report.
Activations are not counted: the device's own memory guard catches a budget
that was too optimistic and answers `TaskFailed("memory_budget")`.

After such a failure the device gets a cap, `MEMORY_BACKOFF` times the ratio
it failed at, for the rest of the run (`Fleet.memory_exceeded`); it halves
again if it fails again, so a device converges on a width it can train.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from msfusion.algorithm.planning import DeviceSlot
from msfusion.algorithm.spec import ModelSpec, ratio_for_budget
from msfusion.coordinator.fleet.memory_model import (
    RATIO_STEPS,
    MemoryModel,
    fit_memory_model,
    largest_affordable_ratio,
    samples_from_profile,
)
from msfusion.coordinator.fleet.sizing import ModelSizes
from msfusion.data.sources import ModelInputs, check_report
from msfusion.errors import ConfigError, MemoryBudgetExceeded
from msfusion.wire.protocol import DataReport, Heartbeat, ProfileEntry, ProfileReport, Registration, Welcome

log = logging.getLogger(__name__)

BYTES_PER_PARAM = 24
RUNTIME_BYTES = 400 << 20
MEMORY_BACKOFF = 0.5  # after a memory_budget failure: cap = this x the ratio that failed


@dataclass(frozen=True)
class Sizing:
    """What sizing a device from its profile needs to know of the run.

    Attributes:
        sizes: the model's parameter and activation counts by width ratio.
        model_key: `coordinator.artifacts.profile_key` of the run: profiles of another model are ignored.
        batch_size: the batch size devices train with.
        safety_margin: share of the budget kept free of the predicted peak, in [0, 1).
    """

    sizes: ModelSizes
    model_key: str
    batch_size: int
    safety_margin: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.safety_margin < 1.0 or self.batch_size < 1:
            raise ConfigError(
                f"safety_margin must be in [0, 1) and batch_size >= 1, got {self.safety_margin}, {self.batch_size}"
            )


@dataclass(frozen=True)
class BackendChoice:
    """The backend a profiled device trains with, and the figures it was chosen by.

    Attributes:
        backend: the artifact kind.
        ratio: the width ratio it trains at (a multiple of 1/1024).
        step_time_s: its measured time per step at the profiled width nearest `ratio`.
        predicted_peak_bytes: its memory model's peak at `ratio` and the run's batch size.
        model: that memory model.
        ratios: every profiled candidate's widest fitting ratio (0.0: none fits), by backend.
    """

    backend: str
    ratio: float
    step_time_s: float
    predicted_peak_bytes: int
    model: MemoryModel
    ratios: dict[str, float]


def _step_time_near(entries: Sequence[ProfileEntry], ratio: float, batch_size: int) -> float:
    """The measured step time at the profiled width nearest `ratio` (the run's batch size preferred)."""
    same_batch = [e for e in entries if e.batch_size == batch_size] or list(entries)
    return min(same_batch, key=lambda e: (abs(e.width_ratio - ratio), -e.width_ratio)).step_time_s


def choose_backend(
    profile: ProfileReport, budget_bytes: int, sizing: Sizing, candidates: Sequence[str]
) -> BackendChoice:
    """The fastest profiled backend whose predicted peak fits the budget at the widest ratio any of them affords.

    Entries without a backend (an older device's profile of its one backend) count as `candidates[0]`'s.

    Args:
        profile: the device's profile.
        budget_bytes: the device's memory budget.
        sizing: the run's model sizes, key, batch size and margin.
        candidates: the backends the device may train this run, in order of preference (ties go to the first).

    Returns:
        The choice and its figures.

    Raises:
        ConfigError: the profile is of another model, or no candidate is profiled well enough to fit.
        MemoryBudgetExceeded: not even the narrowest sub-model fits with any candidate.
    """
    if profile.model_key != sizing.model_key:
        raise ConfigError(
            f"the profile is of model {profile.model_key or '(unnamed)'!r}, this run trains {sizing.model_key!r}"
        )
    if not candidates:
        raise ConfigError("no candidate backend")
    fitted: dict[str, tuple[MemoryModel, list[ProfileEntry]]] = {}
    unfit: list[str] = []
    for backend in candidates:
        entries = [e for e in profile.entries if (e.backend or candidates[0]) == backend]
        if not entries:
            continue
        try:
            fitted[backend] = (fit_memory_model(samples_from_profile(entries), sizing.sizes), entries)
        except ConfigError as exc:
            unfit.append(f"{backend}: {exc}")
    if not fitted:
        raise ConfigError(f"the profile holds no usable points of {list(candidates)} ({'; '.join(unfit) or 'none'})")
    ratios: dict[str, float] = {}
    exceeded: MemoryBudgetExceeded | None = None
    for backend, (model, _) in fitted.items():
        try:
            ratios[backend] = largest_affordable_ratio(model, budget_bytes, sizing.batch_size, sizing.safety_margin)
        except MemoryBudgetExceeded as exc:
            ratios[backend], exceeded = 0.0, exceeded or exc
    widest = max(ratios.values())
    if exceeded is not None and widest <= 0.0:  # every candidate raised it
        raise exceeded
    fitting = [b for b in fitted if ratios[b] >= widest]
    times = {b: _step_time_near(fitted[b][1], widest, sizing.batch_size) for b in fitting}
    best = min(fitting, key=lambda b: times[b])  # min keeps the first of equal times: candidates' order
    model = fitted[best][0]
    return BackendChoice(
        backend=best,
        ratio=widest,
        step_time_s=times[best],
        predicted_peak_bytes=math.ceil(model.predict(widest, sizing.batch_size)),
        model=model,
        ratios=ratios,
    )


def ratio_from_profile(profile: ProfileReport, budget_bytes: int, sizing: Sizing) -> tuple[float, MemoryModel]:
    """The widest ratio whose peak, predicted from the device's measured profile, fits its budget with the margin.

    A profile of one backend (`choose_backend` picks among several).

    Args:
        profile: the device's profile (at least three points at two widths).
        budget_bytes: the device's memory budget.
        sizing: the run's model sizes, key, batch size and margin.

    Returns:
        The ratio (a multiple of 1/1024) and the fitted memory model.

    Raises:
        ConfigError: the profile is of another model, or too thin to fit.
        MemoryBudgetExceeded: not even the narrowest sub-model fits.
    """
    backends = list(dict.fromkeys(e.backend for e in profile.entries)) or [""]
    choice = choose_backend(profile, budget_bytes, sizing, backends)
    return choice.ratio, choice.model


def ratio_for_memory(spec: ModelSpec, budget_bytes: int, reported_max: float | None = None) -> float:
    """The largest width ratio a device with `budget_bytes` of memory can train (rule above).

    Args:
        spec: the global model's spec.
        budget_bytes: the device's memory budget.
        reported_max: a cap the device reported itself (None: none).

    Returns:
        A ratio in (0, 1].

    Raises:
        ConfigError: the budget cannot hold even the narrowest sub-model.
    """
    usable = budget_bytes - RUNTIME_BYTES
    share = usable / (BYTES_PER_PARAM * spec.param_count())
    if share <= 0:
        raise ConfigError(f"a budget of {budget_bytes} bytes leaves nothing after the runtime's {RUNTIME_BYTES}")
    ratio = 1.0 if share >= 1.0 else ratio_for_budget(spec, share)
    return min(ratio, reported_max) if reported_max is not None else ratio


@dataclass
class DeviceRecord:
    """What the coordinator knows of one device (fixed size)."""

    device_id: str
    memory_budget_bytes: int
    max_ratio: float
    backends: tuple[str, ...]
    last_seen: float  # coordinator's monotonic clock at the last message from it
    state: str = "idle"  # the device's last reported state, "offline" after its last will
    task_id: str | None = None
    progress: float = 0.0
    failures: int = 0
    last_failure: str = ""
    memory_cap: float = 1.0  # lowered after memory_budget failures; kept across re-registrations
    sized_by: str = "budget"  # "profile" when the ratio came from the device's measured profile
    board: str = ""  # the board profile it reported
    arch: str = ""
    cores: int = 0
    codecs: tuple[str, ...] = ("fp32",)  # the transfer codecs it decodes (`Capacity.codecs`)
    backend: str = ""  # the artifact kind it trains this run (`choose_backend`, its pin, or the run's)
    backend_chosen_by: str = ""  # "profile" (fastest that fits), "pinned" (device.toml) or "default"
    step_time_s: float = 0.0  # the chosen backend's profiled time per step near its ratio (0: no profile)
    predicted_peak_bytes: int = 0  # its memory model's peak at that ratio (0: no profile)


def _backend_fields(
    msg: Registration, candidates: Sequence[str], default: str, choice: BackendChoice | None
) -> tuple[str, str, float, int]:
    """A device's backend, what chose it, and its profiled step time and predicted peak (0 without a profile)."""
    pinned = bool(msg.capacity.pinned_backend)
    if choice is not None:
        by = "pinned" if pinned else "profile"
        return choice.backend, by, choice.step_time_s, choice.predicted_peak_bytes
    backend = default if default in candidates else candidates[0]
    return backend, "pinned" if pinned else "default", 0.0, 0


class Fleet:
    """Registrations and liveness of the run's devices.

    Args:
        spec: the global model's spec (sizes the width ratios).
        run_id: the run; messages of other runs are refused.
        backend: the run's default artifact kind (a device without a usable profile trains it if it can).
        heartbeat_timeout_s: silence after which a device counts as offline.
        sizing: sizes devices that register with a profile (None: the budget rule for all).
        inputs: what the run's model takes: a device whose reported data cannot train it is
            left out (None: data reports are not checked).
        backends: every artifact kind the run may use, in order of preference (default: `backend`
            alone); a device that lists none of them is refused.

    Attributes:
        devices: the admitted devices.
        data: each admitted device's data report (devices that sent one).
        excluded: devices left out for their data, with the reason (not a failure of the run).
        refused: every device whose last registration was refused, with the reason (a budget too
            small, another backend, its data, ...); the excluded ones are among them. A later
            accepted registration removes the entry.
    """

    def __init__(
        self,
        spec: ModelSpec,
        run_id: str,
        backend: str,
        heartbeat_timeout_s: float,
        sizing: Sizing | None = None,
        inputs: ModelInputs | None = None,
        backends: Sequence[str] = (),
    ) -> None:
        self._spec = spec
        self._run_id = run_id
        self._backend = backend
        self._backends = tuple(dict.fromkeys((backend, *backends) if backend not in backends else backends))
        self._timeout_s = heartbeat_timeout_s
        self._sizing = sizing
        self._inputs = inputs
        self.devices: dict[str, DeviceRecord] = {}
        self.data: dict[str, DataReport] = {}
        self.excluded: dict[str, str] = {}
        self.refused: dict[str, str] = {}

    def _candidates(self, msg: Registration) -> tuple[list[str], str]:
        """The backends a registering device may train this run, or the reason it cannot train any."""
        pinned = msg.capacity.pinned_backend
        if pinned:
            if pinned not in self._backends:
                return [], f"device pins backend {pinned!r}; this run trains {list(self._backends)}"
            return [pinned], ""
        candidates = [b for b in self._backends if b in msg.capacity.backends]
        if not candidates:
            return [], f"run needs backend {self._backend!r}, device has {msg.capacity.backends}"
        return candidates, ""

    def _ratio(self, msg: Registration, candidates: Sequence[str]) -> tuple[float, str, BackendChoice | None]:
        """A registering device's width ratio, how it was found ("profile" or "budget"), and its profiled choice.

        Raises:
            ConfigError, MemoryBudgetExceeded: the device cannot train even the narrowest sub-model.
        """
        capacity = msg.capacity
        if msg.profile is not None and self._sizing is not None:
            try:
                choice = choose_backend(msg.profile, capacity.memory_budget_bytes, self._sizing, candidates)
            except ConfigError as exc:
                log.warning("device %s: profile not used (%s); sizing it from its budget", msg.device_id, exc)
            else:
                model = choice.model
                log.info(
                    "device %s: %s, profile fit %.0f MiB + %.1f B/param + %.2f B/activation (max error %.1f%%); "
                    "widest fitting ratio by backend %s",
                    msg.device_id,
                    choice.backend,
                    model.overhead_bytes / 2**20,
                    model.bytes_per_param,
                    model.bytes_per_activation,
                    100 * model.max_relative_error,
                    choice.ratios,
                )
                ratio = choice.ratio
                capped = min(ratio, capacity.max_width_ratio) if capacity.max_width_ratio is not None else ratio
                return capped, "profile", choice
        ratio = ratio_for_memory(self._spec, capacity.memory_budget_bytes, capacity.max_width_ratio)
        return ratio, "budget", None

    def register(self, msg: Registration, now: float) -> Welcome:
        """Admit (or re-admit) a device; the answer goes back on its control topic."""
        reason = ""
        candidates, no_backend = self._candidates(msg)
        if msg.run_id != self._run_id:
            reason = f"this coordinator runs {self._run_id!r}, not {msg.run_id!r}"
        elif no_backend:
            reason = no_backend
        elif msg.data is not None and self._inputs is not None and (why := check_report(msg.data, self._inputs)):
            reason = f"its data cannot train this run's model: {why}"
            self.excluded[msg.device_id] = reason  # left out of planning; the run goes on without it
        ratio, sized_by, choice = 0.0, "budget", None
        if not reason:
            try:
                ratio, sized_by, choice = self._ratio(msg, candidates)
            except (ConfigError, MemoryBudgetExceeded) as exc:
                reason = str(exc)
        if reason:
            log.warning("refused device %s: %s", msg.device_id, reason)
            self.refused[msg.device_id] = reason
            if self.excluded.get(msg.device_id) != reason:  # refused now for something other than its data
                self.excluded.pop(msg.device_id, None)
            self.devices.pop(msg.device_id, None)
            self.data.pop(msg.device_id, None)
            return Welcome(run_id=self._run_id, device_id=msg.device_id, accepted=False, reason=reason)
        self.excluded.pop(msg.device_id, None)
        self.refused.pop(msg.device_id, None)
        if msg.data is not None:
            self.data[msg.device_id] = msg.data
            for problem in msg.data.problems:
                log.warning("device %s data: %s", msg.device_id, problem)
        known = self.devices.get(msg.device_id)
        record = DeviceRecord(
            device_id=msg.device_id,
            memory_budget_bytes=msg.capacity.memory_budget_bytes,
            max_ratio=ratio,
            backends=tuple(msg.capacity.backends),
            last_seen=now,
            failures=known.failures if known else 0,
            last_failure=known.last_failure if known else "",
            memory_cap=known.memory_cap if known else 1.0,
            sized_by=sized_by,
            board=msg.capacity.board,
            arch=msg.capacity.arch,
            cores=msg.capacity.cores,
            codecs=tuple(msg.capacity.codecs),
        )
        record.backend, record.backend_chosen_by, record.step_time_s, record.predicted_peak_bytes = _backend_fields(
            msg, candidates, self._backend, choice
        )
        self.devices[msg.device_id] = record
        log.info(
            "device %s registered: budget %d B -> width ratio %.4f (from its %s), backend %s (%s)%s",
            msg.device_id,
            record.memory_budget_bytes,
            ratio,
            sized_by,
            record.backend,
            record.backend_chosen_by,
            f", capped at {record.memory_cap:.4f} after running out of memory" if record.memory_cap < ratio else "",
        )
        return Welcome(run_id=self._run_id, device_id=msg.device_id, accepted=True)

    def backend_of(self, device_id: str) -> str:
        """The artifact kind a device trains this run (the run's default for one not registered)."""
        record = self.devices.get(device_id)
        return record.backend if record is not None and record.backend else self._backend

    def width_ratio(self, device_id: str) -> float:
        """The ratio a device trains at: its sized ratio under its memory cap."""
        record = self.devices[device_id]
        return min(record.max_ratio, record.memory_cap)

    def memory_exceeded(self, device_id: str, failed_ratio: float) -> float:
        """A device ran out of memory training at `failed_ratio`: cap it at `MEMORY_BACKOFF` times that.

        Returns:
            The device's new cap (a multiple of 1/1024, at least 1/1024).
        """
        record = self.devices.get(device_id)
        cap: float = max(1, math.floor(failed_ratio * MEMORY_BACKOFF * RATIO_STEPS)) / RATIO_STEPS
        if record is None:
            return cap
        record.memory_cap = min(record.memory_cap, cap)
        log.warning(
            "device %s ran out of memory at width %.4f: capped at %.4f", device_id, failed_ratio, record.memory_cap
        )
        return record.memory_cap

    def heartbeat(self, msg: Heartbeat, now: float) -> None:
        """Note a device's state; an "offline" heartbeat is its last will."""
        record = self.devices.get(msg.device_id)
        if record is None or msg.run_id != self._run_id:
            return
        if msg.state == "offline" and record.state != "offline":
            log.warning("device %s went offline", msg.device_id)
        record.state = msg.state
        record.task_id = msg.task_id
        record.progress = msg.progress
        record.last_seen = now

    def seen(self, device_id: str, now: float) -> None:
        """Any message from a device shows it is alive."""
        record = self.devices.get(device_id)
        if record is not None and record.state != "offline":
            record.last_seen = now

    def online(self, device_id: str, now: float) -> bool:
        """Registered, not offline by its last will, and heard from recently."""
        record = self.devices.get(device_id)
        if record is None or record.state == "offline":
            return False
        return now - record.last_seen <= self._timeout_s

    def count_online(self, now: float) -> int:
        """How many devices are `online` (O(devices), without sorting or sizing them)."""
        return sum(1 for r in self.devices.values() if r.state != "offline" and now - r.last_seen <= self._timeout_s)

    def participants(self, now: float) -> list[DeviceSlot]:
        """The online devices in ring order (sorted by id, as the reference engine orders them)."""
        return [
            DeviceSlot(device_id, self.width_ratio(device_id))
            for device_id in sorted(self.devices)
            if self.online(device_id, now)
        ]

    def note_failure(self, device_id: str, reason: str) -> None:
        """Remember why a device's task failed (for the summary)."""
        record = self.devices.get(device_id)
        if record is not None:
            record.failures += 1
            record.last_failure = reason

    def snapshot(self, now: float) -> Sequence[tuple[str, str, float]]:
        """(device, state, progress) per device, for progress displays."""
        return [(d, r.state if self.online(d, now) else "offline", r.progress) for d, r in sorted(self.devices.items())]
