"""Local training on the device: E epochs over the shard through a `TrainingBackend` (torch-free).

`train_local` is the device loop: set the weights, draw the seeded batch
order the reference engine draws (msfusion/algorithm/batches.py), step, and measure
step time and peak memory. The MQTT daemon's `train_task(task)` wraps it:
fetch and unpack the artifact (`artifacts.unpack_artifact`), unpack the
weights (`weights.unpack_weights`), build the frozen references
(`artifacts.reference_weights` over `indexing.reslice_previous`), call
`train_local`, and pack the result (`weights.pack_weights`). A task in a compressed codec
(`TrainTask.codec`, `wire/codec.py`) sends the rounded weights and gets back the rounded update
(trained - received), the int8 one with error feedback: `pack_slice`.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np
import numpy.typing as npt

from msfusion.algorithm.batches import batch_indices, samples_per_epoch
from msfusion.algorithm.indexing import TensorIndex, reslice_previous
from msfusion.algorithm.slicing import Weights
from msfusion.data.sources import Source, open_source
from msfusion.edge_runtime.backends.base import TrainingBackend, backend_device, make_backend
from msfusion.edge_runtime.config import data_spec
from msfusion.edge_runtime.ledger import LocalState, slice_index
from msfusion.edge_runtime.memory import MemoryReport, MemorySampler, current_rss_bytes
from msfusion.errors import (
    ArtifactError,
    ConfigError,
    MemoryBudgetExceeded,
    MsfusionError,
    ProtocolError,
)
from msfusion.wire.artifacts import (
    MANIFEST_NAME,
    load_manifest,
    reference_weights,
    unpack_artifact,
)
from msfusion.wire.bulk import make_manifest
from msfusion.wire.bulk import slice_transfer_id as bulk_slice_transfer_id
from msfusion.wire.codec import check_like, pack_update, unpack
from msfusion.wire.protocol import (
    BulkRef,
    SliceResult,
    TaskFailed,
    TrainTask,
    failure_code,
)
from msfusion.wire.weights import pack_weights

if TYPE_CHECKING:
    from msfusion.edge_runtime.config import DeviceConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalResult:
    """What one local training run returns.

    Attributes:
        weights: the trained slice (trainable tensors only, spec names).
        n_samples: samples trained per epoch (the merge weight).
        loss_curve: the loss of every step, before its update (may hold NaN).
        step_time_s: mean seconds per `train_step`.
        wall_s: seconds for the whole run, weight setting included.
        peak_rss_bytes: peak resident memory during the run.
        memory: the full memory report.
    """

    weights: Weights
    n_samples: int
    loss_curve: tuple[float, ...]
    step_time_s: float
    wall_s: float
    peak_rss_bytes: int
    memory: MemoryReport


def train_local(
    backend: TrainingBackend,
    trainable: Mapping[str, npt.NDArray[np.float32]],
    frozen: Mapping[str, npt.NDArray[np.float32]],
    x: npt.NDArray[np.generic],
    y: npt.NDArray[np.int64],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_samples: int = 0,
    lr_schedule: str = "none",
    progress: Callable[[float], None] | None = None,
    memory_budget_bytes: int = 0,
    release_weights: bool = False,
    stop: threading.Event | None = None,
) -> LocalResult:
    """Train a loaded backend over a local shard, as the reference engine's `local_train` does.

    Args:
        backend: a backend with its artifact loaded (its batch size must be `batch_size`).
        trainable: the starting sub-model weights (spec names).
        frozen: the frozen references (`artifacts.reference_weights`).
        x: the shard's inputs, (N, ...).
        y: the shard's targets, (N,) or (N, T).
        epochs: local epochs E.
        batch_size: samples per step.
        lr: learning rate.
        seed: the batch-order seed (the same as the reference engine's).
        max_samples: cap on samples per epoch (0 = the whole shard).
        lr_schedule: only "none" (a constant lr) is supported.
        progress: called after every step with the share of steps done (for heartbeats).
        memory_budget_bytes: the memory guard (0 = off): the sampler's thread
            watches this process's RSS (and the kernel's VmHWM) and the loop
            stops at the first step boundary after the peak passed the budget.
        release_weights: clear `trainable` and `frozen` (when they are dicts) once
            the backend holds its own copies, so the arrays are freed during
            training unless the caller keeps other references to them (at a
            101M-parameter char-LM: 0.8 GB less at the peak).
        stop: when set (SIGTERM), the loop ends at the next step boundary with `TrainingStopped`.

    Returns:
        The trained slice and its figures.

    Raises:
        ConfigError: bad epochs, an unknown schedule, mismatched x and y, or
            fewer samples than one batch.
        ArtifactError: the backend refused the weights or a batch.
        MemoryBudgetExceeded: the guard stopped the run (the caller frees the backend).
        TrainingStopped: `stop` was set.
    """
    if lr_schedule != "none":
        raise ConfigError(f"lr_schedule {lr_schedule!r} is not supported (only 'none')")
    if epochs < 1 or lr <= 0:
        raise ConfigError(f"epochs must be >= 1 and lr > 0, got {epochs} and {lr}")
    if len(x) != len(y):
        raise ConfigError(f"the shard has {len(x)} inputs but {len(y)} targets")
    n_samples = samples_per_epoch(len(x), batch_size, max_samples)
    order = list(batch_indices(len(x), batch_size, epochs, seed, max_samples))  # ConfigError if < 1 batch

    losses: list[float] = []
    step_total = 0.0
    start = time.perf_counter()
    with MemorySampler() as sampler:
        backend.set_weights(trainable, frozen)
        for given in (trainable, frozen) if release_weights else ():
            if isinstance(given, dict):
                given.clear()
        _check_budget(sampler, memory_budget_bytes, "setting the weights")
        for done, index in enumerate(order, start=1):
            x_batch, y_batch = x[index], y[index]  # (N, ...) -> (batch_size, ...)
            step_start = time.perf_counter()
            losses.append(backend.train_step(x_batch, y_batch, lr))
            step_total += time.perf_counter() - step_start
            _check_budget(sampler, memory_budget_bytes, f"step {done} of {len(order)}")
            if stop is not None and stop.is_set():
                raise TrainingStopped(f"stopped after step {done} of {len(order)}")
            if progress is not None:
                progress(done / len(order))
        weights = backend.weights()
    wall_s = time.perf_counter() - start
    memory = sampler.report
    if memory is None:  # unreachable: the context manager always stops the sampler
        raise RuntimeError("memory sampler produced no report")
    return LocalResult(
        weights=weights,
        n_samples=n_samples,
        loss_curve=tuple(losses),
        step_time_s=step_total / len(order),
        wall_s=wall_s,
        peak_rss_bytes=memory.peak_rss_bytes,
        memory=memory,
    )


def _check_budget(sampler: MemorySampler, budget_bytes: int, after: str) -> None:
    """The memory guard, between steps: stop once the peak so far passed the budget."""
    if not budget_bytes:
        return
    peak = sampler.peak_bytes()
    if peak > budget_bytes:
        raise MemoryBudgetExceeded(
            f"stopped after {after}: memory peaked at {peak / 2**20:.0f} MiB, over the budget of "
            f"{budget_bytes / 2**20:.0f} MiB",
            peak_bytes=peak,
            budget_bytes=budget_bytes,
        )


# ---------------------------------------------------------------- one task from the fleet


@dataclass(frozen=True)
class TaskOutcome:
    """A task's one reply (a SliceResult or a TaskFailed, never both) and the slice a result carries."""

    reply: SliceResult | TaskFailed
    slice_bytes: bytes | None
    local: LocalState | None = None  # a compressed task's trained slice and residual (the ledger keeps them)


class TaskIO(Protocol):
    """How `train_task` receives a task's bulk data (the daemon implements it over MQTT)."""

    def fetch(self, manifest: BulkRef, pull: bool) -> bytes:
        """The verified payload of a transfer; `pull` asks the sender for every chunk first."""
        ...


class _DeadlinePassed(MsfusionError):
    """Local training outlasted the task's deadline (counted from receipt: clocks are not shared)."""


class TrainingStopped(MsfusionError):
    """The daemon was told to stop (SIGTERM) during a task: it has no reply, and is not recorded."""


def check_task_sizes(task: TrainTask, memory_budget_bytes: int) -> None:
    """Refuse a task whose transfers could not fit this device, before any of them is fetched.

    The schema bounds every size (`protocol.MAX_TRANSFER_BYTES`); a device bounds them by what
    it can hold: the artifact and the weights are in memory at once, so together they must fit
    its memory budget.

    Raises:
        ProtocolError: the transfers declare more bytes than the budget, or are not of their kinds.
    """
    for ref, kind in ((task.artifact, "artifact"), (task.weights, "weights")):
        if ref.kind != kind:
            raise ProtocolError(f"the task's {kind} transfer {ref.transfer_id} is of kind {ref.kind!r}")
    declared = task.artifact.total_bytes + task.weights.total_bytes
    if declared > memory_budget_bytes:
        raise ProtocolError(
            f"the task's transfers declare {declared} bytes (artifact {task.artifact.total_bytes}, weights "
            f"{task.weights.total_bytes}), over this device's memory budget of {memory_budget_bytes} bytes"
        )


def warm_up(backends: tuple[str, ...], device: str = "cpu") -> None:
    """Import each backend's runtime now, so the first task does not pay for it (ONNX Runtime: ~2 s).

    Args:
        backends: the artifact kinds the device trains.
        device: where the torch backend trains ("cpu" or "cuda", device.toml's `device`).

    Raises:
        ArtifactError: a runtime is not installed, or device = "cuda" where torch sees no GPU.
    """
    for kind in backends:
        # Creating a backend imports its runtime. Not onnxruntime.training.api: that
        # package's __init__ imports torch, which a board does not have (backends/ort.py).
        make_backend(kind, device=backend_device(kind, device)).close()


class _Progress:
    """A backend that reports the share of steps done after each step (for heartbeats)."""

    def __init__(self, backend: TrainingBackend, steps: int, on_progress: Callable[[float], None] | None) -> None:
        self._backend = backend
        self._steps = max(1, steps)
        self._done = 0
        self._on_progress = on_progress
        self.kind = backend.kind

    def load(self, artifact_dir: Any, manifest: Any) -> None:
        self._backend.load(artifact_dir, manifest)

    def set_weights(self, trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> None:
        self._backend.set_weights(trainable, frozen)

    def train_step(self, x: npt.NDArray[np.generic], y: npt.NDArray[np.int64], lr: float) -> float:
        loss = float(self._backend.train_step(x, y, lr))
        self._done += 1
        if self._on_progress is not None:
            self._on_progress(self._done / self._steps)
        return loss

    def weights(self) -> Weights:
        trained: Weights = self._backend.weights()
        return trained

    def close(self) -> None:
        self._backend.close()


def slice_transfer_id(task: TrainTask) -> str:
    """The upload id of a task's trained slice (unique per run, round, device and task; the coordinator expects it)."""
    return bulk_slice_transfer_id(task.task_id, task.device_id)


def pack_slice(
    task: TrainTask,
    received: bytes,
    trained: Mapping[str, npt.NDArray[np.float32]],
    previous_index: Mapping[str, TensorIndex] | None = None,
    residual: Mapping[str, npt.NDArray[np.float32]] | None = None,
) -> tuple[bytes, LocalState | None]:
    """The slice to upload in the task's codec, and what the device keeps of it.

    fp32: the trained weights. fp16 / int8: the rounded update, trained - what was received (the
    coordinator adds it to the exact sub-model it cut); int8 first adds the residual of the last
    update (error feedback), re-sliced to this task's elements: units no longer held drop theirs,
    new units start at 0.

    Args:
        task: the task.
        received: the task's weights payload, as fetched.
        trained: the trained slice.
        previous_index: the element indices `residual` is on (those of the negative's slice).
        residual: int8: what rounding took from that slice's update (None: none).

    Returns:
        The payload, and (compressed tasks) the trained slice and the new residual, packed.

    Raises:
        ArtifactError, ProtocolError: `received` does not decode.
        InvalidSlice: the trained slice holds a tensor the task did not send, or another shape.
    """
    if task.codec == "fp32":
        return pack_weights(trained), None
    start = unpack(received, task.codec, update=False)
    check_like(trained, start)
    update = {name: np.asarray(values, np.float32) - start[name] for name, values in trained.items()}
    carried = None
    if residual is not None and previous_index is not None:
        zeros = {name: np.zeros_like(values) for name, values in update.items()}
        carried = reslice_previous(zeros, slice_index(task.units, task.tensor_axes), residual, previous_index)
    packed, kept = pack_update(update, task.codec, carried)
    return packed, LocalState(pack_weights(trained), None if kept is None else pack_weights(kept))


def train_task(
    task: TrainTask,
    io: TaskIO,
    previous: tuple[Weights, Mapping[str, TensorIndex]] | None,
    config: DeviceConfig,
    on_progress: Callable[[float], None] | None = None,
    source: Source | None = None,
    stop: threading.Event | None = None,
    residual: Weights | None = None,
) -> TaskOutcome:
    """Run one fleet task: artifact, weights, the re-sliced negative, local training, the packed slice.

    Args:
        task: the task (validated on decode).
        io: receives the artifact and weights transfers.
        previous: the last trained local slice and its element indices (None before the first).
        config: the device's config (data, state folder, budget, backends, threads).
        on_progress: called with the share of steps done.
        source: the device's data, opened (None: open `config`'s data now).
        stop: set by the daemon's SIGTERM handler: training ends at the next step boundary.
        residual: an int8 task's error-feedback residual of `previous`'s update, on its elements.

    Returns:
        The reply to send: a SliceResult with its packed slice, or a TaskFailed
        naming why (memory budget, artifact, data, protocol, internal).

    Raises:
        TrainingStopped: `stop` was set during training (no reply: the task was not done).
    """
    started = time.perf_counter()
    try:
        if task.backend not in config.backends:
            raise ArtifactError(f"task needs backend {task.backend!r}; this device runs {list(config.backends)}")
        check_task_sizes(task, config.memory_budget_bytes)
        # The artifact: fetched once per content sha256, then from the device's cache.
        artifact_dir = config.state_dir / "artifacts" / task.artifact.sha256
        if not (artifact_dir / MANIFEST_NAME).exists():
            staging = artifact_dir.with_name(f".{task.artifact.sha256}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            unpack_artifact(io.fetch(task.artifact, pull=True), staging)
            staging.rename(artifact_dir)
        manifest = load_manifest(artifact_dir)
        # The global sub-model this round starts from (in the task's codec: rounded), and the contrastive
        # term's positive. A compressed payload is kept (a quarter of the fp32 size at int8): `start`
        # itself is released during training, and the update is taken against it.
        received = io.fetch(task.weights, pull=False)
        start = unpack(received, task.codec, update=False)
        received = received if task.codec != "fp32" else b""  # fp32: the slice is the trained weights
        # The previous local slice re-sliced to this round's units: the contrastive negative.
        index_now = slice_index(task.units, task.tensor_axes)
        prev_weights, prev_index = previous if previous is not None else (None, None)
        negative = reslice_previous(start, index_now, prev_weights, prev_index)
        # The device's own data, turned into the model's inputs by the run's preprocessing (lazily for images).
        x, y = (source or open_source(data_spec(config))).arrays(task.preprocessing)
        backend = make_backend(
            task.backend, num_threads=config.threads, device=backend_device(task.backend, config.device)
        )
        try:
            backend.load(artifact_dir, manifest)
            loaded_rss = current_rss_bytes()
            if loaded_rss > config.memory_budget_bytes:
                raise MemoryBudgetExceeded(
                    f"loading the artifact took memory to {loaded_rss / 2**20:.0f} MiB, over the budget of "
                    f"{config.memory_budget_bytes / 2**20:.0f} MiB",
                    peak_bytes=loaded_rss,
                    budget_bytes=config.memory_budget_bytes,
                )
            if manifest.batch_size != task.batch_size:
                raise ArtifactError(
                    f"artifact trains batches of {manifest.batch_size}, the task says {task.batch_size}"
                )
            steps = task.local_epochs * samples_per_epoch(len(x), task.batch_size, task.max_samples) // task.batch_size
            frozen = reference_weights(manifest, start, negative)
            del negative  # its arrays live on in `frozen` only, which train_local clears with `start`
            result = train_local(
                _Progress(backend, steps, on_progress),
                start,
                frozen,
                x,
                y,
                epochs=task.local_epochs,
                batch_size=task.batch_size,
                lr=task.lr,
                seed=task.seed,
                max_samples=task.max_samples,
                memory_budget_bytes=config.memory_budget_bytes,
                release_weights=True,
                stop=stop,
            )
        finally:
            backend.close()
        if result.peak_rss_bytes > config.memory_budget_bytes:
            raise MemoryBudgetExceeded(
                f"training peaked at {result.peak_rss_bytes} bytes, over the budget of {config.memory_budget_bytes}",
                peak_bytes=result.peak_rss_bytes,
                budget_bytes=config.memory_budget_bytes,
            )
        if time.perf_counter() - started > task.deadline_s:
            # The round has closed without us: say so instead of uploading a slice nobody merges.
            raise _DeadlinePassed(
                f"training took {time.perf_counter() - started:.1f} s, over the task's {task.deadline_s:.1f} s"
            )
        packed, local = pack_slice(task, received, result.weights, prev_index, residual)
        upload = make_manifest(slice_transfer_id(task), "slice", packed)
        reply: SliceResult | TaskFailed = SliceResult(
            run_id=task.run_id,
            round_idx=task.round_idx,
            device_id=task.device_id,
            task_id=task.task_id,
            weights=upload,
            n_samples=result.n_samples,
            loss_curve=list(result.loss_curve),
            step_time_s=result.step_time_s,
            peak_rss_bytes=result.peak_rss_bytes,
            wall_s=time.perf_counter() - started,
        )
        return TaskOutcome(reply, packed, local)
    except TrainingStopped:
        raise
    except Exception as exc:  # noqa: BLE001 - the task's boundary: every failure becomes one TaskFailed
        if isinstance(exc, (MsfusionError, OSError)):
            log.warning("task %s failed: %s", task.task_id, exc)
        else:
            log.exception("task %s failed unexpectedly", task.task_id)
        details: dict[str, int | float | str] = {}
        if isinstance(exc, MemoryBudgetExceeded):
            details = {"peak_bytes": exc.peak_bytes, "budget_bytes": exc.budget_bytes}
        failed = TaskFailed(
            run_id=task.run_id,
            round_idx=task.round_idx,
            device_id=task.device_id,
            task_id=task.task_id,
            code="deadline" if isinstance(exc, _DeadlinePassed) else failure_code(exc),
            reason=(str(exc) or type(exc).__name__)[:4000],  # MemoryError() has no message
            details=details,
        )
        return TaskOutcome(failed, None)
