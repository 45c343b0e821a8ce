"""Fleet state on the coordinator: registrations, liveness, and each device's width ratio.

One `DeviceRecord` per registered device, of fixed size: the fleet's state
grows with the number of devices, never with the number of rounds.

Width from memory budget (until measured profiles exist, a later issue): a
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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from msfusion.coordinator.planning import DeviceSlot
from msfusion.coordinator.spec import ModelSpec, ratio_for_budget
from msfusion.edge_runtime.protocol import Heartbeat, Registration, Welcome
from msfusion.errors import ConfigError

log = logging.getLogger(__name__)

BYTES_PER_PARAM = 24
RUNTIME_BYTES = 400 << 20


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


class Fleet:
    """Registrations and liveness of the run's devices.

    Args:
        spec: the global model's spec (sizes the width ratios).
        run_id: the run; messages of other runs are refused.
        backend: the artifact kind this run trains; devices without it are refused.
        heartbeat_timeout_s: silence after which a device counts as offline.
    """

    def __init__(self, spec: ModelSpec, run_id: str, backend: str, heartbeat_timeout_s: float) -> None:
        self._spec = spec
        self._run_id = run_id
        self._backend = backend
        self._timeout_s = heartbeat_timeout_s
        self.devices: dict[str, DeviceRecord] = {}

    def register(self, msg: Registration, now: float) -> Welcome:
        """Admit (or re-admit) a device; the answer goes back on its control topic."""
        reason = ""
        if msg.run_id != self._run_id:
            reason = f"this coordinator runs {self._run_id!r}, not {msg.run_id!r}"
        elif self._backend not in msg.capacity.backends:
            reason = f"run needs backend {self._backend!r}, device has {msg.capacity.backends}"
        ratio = 0.0
        if not reason:
            try:
                ratio = ratio_for_memory(self._spec, msg.capacity.memory_budget_bytes, msg.capacity.max_width_ratio)
            except ConfigError as exc:
                reason = str(exc)
        if reason:
            log.warning("refused device %s: %s", msg.device_id, reason)
            self.devices.pop(msg.device_id, None)
            return Welcome(run_id=self._run_id, device_id=msg.device_id, accepted=False, reason=reason)
        known = self.devices.get(msg.device_id)
        record = DeviceRecord(
            device_id=msg.device_id,
            memory_budget_bytes=msg.capacity.memory_budget_bytes,
            max_ratio=ratio,
            backends=tuple(msg.capacity.backends),
            last_seen=now,
            failures=known.failures if known else 0,
            last_failure=known.last_failure if known else "",
        )
        self.devices[msg.device_id] = record
        log.info("device %s registered: budget %d B -> width ratio %.4f", msg.device_id, record.memory_budget_bytes, ratio)
        return Welcome(run_id=self._run_id, device_id=msg.device_id, accepted=True)

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

    def participants(self, now: float) -> list[DeviceSlot]:
        """The online devices in ring order (sorted by id, as the reference engine orders them)."""
        return [
            DeviceSlot(device_id, self.devices[device_id].max_ratio)
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
        return [
            (d, r.state if self.online(d, now) else "offline", r.progress) for d, r in sorted(self.devices.items())
        ]
