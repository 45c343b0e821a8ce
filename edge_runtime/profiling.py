"""On-device profiling: train the real artifact a few steps per (width, batch size) and measure memory and time (torch-free).

Each point runs in a fresh process (`python -m msfusion.edge_runtime.profiling`),
because the kernel's high-water mark (VmHWM) and the allocators' arenas are
per process: a point measured after a wider one would inherit its peak. The
child does what the daemon does before a task (imports the runtime with
`trainer.warm_up`, reads the device's shard when there is one), then loads
the artifact, sets weights and trains `warmup + steps` batches under a
`MemorySampler` (RSS every 10 ms, USS, and VmHWM reset at the start).

The artifacts come as a *profile set*: a folder with one artifact per
(width ratio, batch size) and an index, `profile-set.json`::

    {"format_version": 1, "model_key": "3f2a...", "kind": "ort",
     "points": [{"width_ratio": 0.5, "batch_size": 32, "path": "w0.5-b32"}, ...]}

The coordinator writes one (`msfusion devices profile-set`, or
`coordinator.artifacts.export_profile_set`); `model_key` names the model,
loss and optimizer the graphs implement, so the coordinator uses only
profiles of the model it trains. A board that runs several backends profiles
each: `--artifacts` may name a folder of profile sets, one per kind
(`<dir>/<kind>/profile-set.json`, `load_profile_sets`), and every set of a
kind the device runs is measured. The result is one `ProfileReport` whose
entries name their backend, saved as JSON in the device's state folder
(`PROFILE_FILE`), which the daemon sends with its registration; the
coordinator picks, per device, the fastest backend whose predicted peak fits
(`coordinator/fleet/registry.py`, `choose_backend`).

On a GPU (the torch backend with device = "cuda") the process's RSS does not
hold the tensors: each point also records the GPU's peak from torch's own
counter (`PointResult.peak_accelerator_bytes`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from msfusion.atomic import atomic_write
from msfusion.errors import ConfigError, MsfusionError, ProtocolError
from msfusion.wire.protocol import SCHEMA_VERSION, ProfileEntry, ProfileReport

log = logging.getLogger(__name__)

PROFILE_SET_INDEX = "profile-set.json"
PROFILE_SET_FORMAT = 1
PROFILE_FILE = "profile.json"  # in the device's state folder
DEFAULT_WIDTHS = (1.0, 0.5, 0.25, 0.125)


@dataclass(frozen=True)
class ProfileSetPoint:
    """One artifact of a profile set: its width ratio, batch size and folder (relative to the set)."""

    width_ratio: float
    batch_size: int
    path: str


@dataclass(frozen=True)
class ProfileSet:
    """A folder of training artifacts to profile, one per (width ratio, batch size).

    Attributes:
        root: the folder.
        model_key: names the model, loss and optimizer the artifacts implement.
        kind: their artifact kind ("ort" or "executorch").
        points: the artifacts it holds.
    """

    root: Path
    model_key: str
    kind: str
    points: tuple[ProfileSetPoint, ...]

    def select(self, widths: Sequence[float] | None, batch_sizes: Sequence[int] | None) -> list[ProfileSetPoint]:
        """The points at `widths` x `batch_sizes` (None: every one the set holds), widest first.

        Raises:
            ConfigError: the set lacks a requested combination.
        """

        def has(point: ProfileSetPoint, width: float | None, batch: int | None) -> bool:
            return (width is None or abs(point.width_ratio - width) < 1e-9) and (
                batch is None or point.batch_size == batch
            )

        any_width: list[float | None] = list(widths) if widths else [None]
        any_batch: list[int | None] = list(batch_sizes) if batch_sizes else [None]
        wanted = [(w, b) for w in any_width for b in any_batch]
        missing = [(w, b) for w, b in wanted if not any(has(p, w, b) for p in self.points)]
        if missing:
            have = sorted((p.width_ratio, p.batch_size) for p in self.points)
            asked = [(w if w is not None else "any", b if b is not None else "any") for w, b in missing]
            raise ConfigError(f"profile set {self.root} lacks (width, batch) {asked}; it holds {have}")
        chosen = [p for p in self.points if any(has(p, w, b) for w, b in wanted)]
        return sorted(chosen, key=lambda p: (-p.width_ratio, p.batch_size))


def write_profile_set_index(root: Path, model_key: str, kind: str, points: Sequence[ProfileSetPoint]) -> Path:
    """Write `profile-set.json` into `root`; returns its path."""
    data = {
        "format_version": PROFILE_SET_FORMAT,
        "model_key": model_key,
        "kind": kind,
        "points": [asdict(p) for p in points],
    }
    path = Path(root) / PROFILE_SET_INDEX
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def load_profile_set(root: Path) -> ProfileSet:
    """Read a profile set's index.

    Raises:
        ConfigError: no index, a malformed one, or a point whose folder is missing.
    """
    root = Path(root)
    try:
        data = json.loads((root / PROFILE_SET_INDEX).read_text(encoding="utf-8"))
        if data.get("format_version") != PROFILE_SET_FORMAT:
            raise ConfigError(
                f"{root}: profile set format {data.get('format_version')!r}, this runtime reads {PROFILE_SET_FORMAT}"
            )
        points = tuple(
            ProfileSetPoint(float(p["width_ratio"]), int(p["batch_size"]), str(p["path"])) for p in data["points"]
        )
        profile_set = ProfileSet(root, str(data["model_key"]), str(data["kind"]), points)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{root} is not a profile set ({PROFILE_SET_INDEX}): {exc}") from exc
    for point in points:
        if (
            not 0.0 < point.width_ratio <= 1.0
            or point.batch_size < 1
            or "/" in point.path
            or point.path.startswith(".")
        ):
            raise ConfigError(f"{root}: invalid profile point {point}")
        if not (root / point.path).is_dir():
            raise ConfigError(f"{root}: the artifact folder {point.path!r} is missing")
    return profile_set


def load_profile_sets(root: Path) -> list[ProfileSet]:
    """The profile set in `root`, or else one per subfolder that holds one (one per backend), by kind.

    Raises:
        ConfigError: no set at all, a malformed one, two of one kind, or sets of different models.
    """
    root = Path(root)
    if (root / PROFILE_SET_INDEX).is_file():
        return [load_profile_set(root)]
    folders = sorted(p for p in root.iterdir() if (p / PROFILE_SET_INDEX).is_file()) if root.is_dir() else []
    sets = [load_profile_set(folder) for folder in folders]
    if not sets:
        raise ConfigError(f"{root} is not a profile set (no {PROFILE_SET_INDEX} in it or in a subfolder)")
    kinds = [s.kind for s in sets]
    if len(set(kinds)) != len(kinds) or len({s.model_key for s in sets}) != 1:
        raise ConfigError(f"{root}: the profile sets must be of one model and one per kind, got {kinds}")
    return sets


@dataclass(frozen=True)
class PointResult:
    """What one profiled point measured (bytes, seconds); `error` is set when it failed.

    Attributes:
        width_ratio: the sub-model's width ratio.
        batch_size: samples per step.
        peak_rss_bytes: the process's peak resident memory (samples and VmHWM).
        peak_uss_bytes: its peak unique memory.
        hwm_bytes: VmHWM at the end.
        baseline_rss_bytes: RSS before the artifact was loaded (runtime, data).
        step_time_s: median seconds per timed step.
        steps: timed steps.
        wall_s: the child's whole run, imports included.
        error: why the point failed ("" when it did not).
        backend: the artifact kind it trained.
        peak_accelerator_bytes: the GPU's peak (torch's counter) when it trained there, else 0.
    """

    width_ratio: float
    batch_size: int
    peak_rss_bytes: int = 0
    peak_uss_bytes: int = 0
    hwm_bytes: int = 0
    baseline_rss_bytes: int = 0
    step_time_s: float = 0.0
    steps: int = 0
    wall_s: float = 0.0
    error: str = ""
    backend: str = ""
    peak_accelerator_bytes: int = 0


@dataclass(frozen=True)
class ProfileOptions:
    """How each point is measured.

    Attributes:
        steps: timed training steps.
        warmup: untimed steps first (the first step allocates the runtime's buffers;
            they still count towards the peak).
        threads: intra-op threads (as the daemon's `threads`).
        backends: the runtimes the daemon warms up (its imports are in the baseline).
        data_dir: the device's shard, read as the daemon reads it (None: random batches).
        timeout_s: seconds one point may take.
        device: where the torch backend trains ("cpu" or "cuda", device.toml's `device`).
    """

    steps: int = 3
    warmup: int = 1
    threads: int = 1
    backends: tuple[str, ...] = ("ort",)
    data_dir: Path | None = None
    timeout_s: float = 300.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.threads < 1 or self.timeout_s <= 0:
            raise ConfigError("profile: steps and threads must be >= 1, warmup >= 0, timeout_s > 0")


def _start_weights(shapes: Sequence[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes}


def _batches(
    x_shape: tuple[int, ...], x_dtype: str, y_shape: tuple[int, ...], data_dir: Path | None, count: int
) -> list[tuple[npt.NDArray[np.generic], npt.NDArray[np.int64]]]:
    """`count` batches of the artifact's shapes: from the shard when there is one, else random inputs, label 0."""
    if data_dir is not None:
        from msfusion.data.shards import read_shard

        x, y, _ = read_shard(data_dir)
        batch = x_shape[0]
        if tuple(x.shape[1:]) != x_shape[1:] or tuple(y.shape[1:]) != y_shape[1:] or len(x) < batch:
            raise ConfigError(
                f"the shard in {data_dir} holds {x.shape} / {y.shape}, the artifact trains batches of {x_shape} / {y_shape}"
            )
        starts = [(i * batch) % (len(x) - batch + 1) for i in range(count)]
        return [(x[s : s + batch], y[s : s + batch]) for s in starts]
    rng = np.random.default_rng(0)
    if x_dtype == "int64":
        xb: npt.NDArray[np.generic] = np.zeros(x_shape, np.int64)  # token 0 is valid for any vocabulary
    else:
        xb = rng.standard_normal(x_shape).astype(x_dtype)
    return [(xb, np.zeros(y_shape, np.int64)) for _ in range(count)]


def measure_point(artifact_dir: Path, options: ProfileOptions) -> PointResult:
    """Train the artifact in `artifact_dir` for `warmup + steps` steps in this process and measure it.

    Call it in a fresh process (`run_point` does): the peak covers the whole process.

    Raises:
        ArtifactError: the artifact cannot be loaded or trained.
        ConfigError, DataError: the shard does not fit the artifact.
    """
    from msfusion.edge_runtime.backends.base import MeasuresAccelerator, backend_device, make_backend
    from msfusion.edge_runtime.memory import MemorySampler
    from msfusion.edge_runtime.trainer import warm_up
    from msfusion.wire.artifacts import load_manifest, reference_weights

    began = time.perf_counter()
    warm_up(options.backends, options.device)  # the daemon's imports: part of every task's memory
    manifest = load_manifest(artifact_dir)
    x_info, y_info = manifest.inputs
    batches = _batches(x_info.shape, x_info.dtype, y_info.shape, options.data_dir, options.warmup + options.steps)
    trainable = _start_weights([(t.name, t.shape) for t in manifest.params], seed=1)
    frozen = reference_weights(
        manifest, trainable, _start_weights([(t.name, t.shape) for t in manifest.params], seed=2)
    )
    times: list[float] = []
    backend = make_backend(
        manifest.kind, num_threads=options.threads, device=backend_device(manifest.kind, options.device)
    )
    accelerator = 0
    try:
        with MemorySampler() as sampler:  # stopped before close(): USS is read while the runtime holds its buffers
            backend.load(artifact_dir, manifest)
            backend.set_weights(trainable, frozen)
            for index, (x, y) in enumerate(batches):
                started = time.perf_counter()
                backend.train_step(x, y, 0.01)
                if index >= options.warmup:
                    times.append(time.perf_counter() - started)
        if isinstance(backend, MeasuresAccelerator):
            accelerator = backend.peak_accelerator_bytes()
    finally:
        backend.close()
    report = sampler.report
    if report is None:  # unreachable: the context manager always stops the sampler
        raise RuntimeError("memory sampler produced no report")
    return PointResult(
        width_ratio=0.0,
        batch_size=manifest.batch_size,
        peak_rss_bytes=report.peak_rss_bytes,
        peak_uss_bytes=report.peak_uss_bytes,
        hwm_bytes=report.hwm_bytes,
        baseline_rss_bytes=report.baseline_rss_bytes,
        step_time_s=statistics.median(times),
        steps=len(times),
        wall_s=time.perf_counter() - began,
        backend=manifest.kind.value,
        peak_accelerator_bytes=accelerator,
    )


def run_point(profile_set: ProfileSet, point: ProfileSetPoint, options: ProfileOptions) -> PointResult:
    """Measure one point in a fresh Python process; a failed or killed child gives a result with `error`."""
    request = {"artifact_dir": str(profile_set.root / point.path), **asdict(options)}
    request["data_dir"] = str(options.data_dir) if options.data_dir is not None else None
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
    command = [sys.executable, "-m", "msfusion.edge_runtime.profiling", json.dumps(request)]
    failed = PointResult(point.width_ratio, point.batch_size, backend=profile_set.kind)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=options.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return PointResult(**{**asdict(failed), "error": f"timed out after {options.timeout_s:.0f} s"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        # -9: the kernel's OOM killer (or a cgroup limit) stopped it; that width does not fit.
        why = "killed (out of memory?)" if proc.returncode == -9 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        return PointResult(**{**asdict(failed), "error": f"exit {proc.returncode}: {why}"[:400]})
    measured = json.loads(lines[-1])
    return PointResult(**{**measured, "width_ratio": point.width_ratio})


def run_profile(
    profile_set: ProfileSet, widths: Sequence[float] | None, batch_sizes: Sequence[int] | None, options: ProfileOptions
) -> list[PointResult]:
    """Measure every selected point of a profile set, widest first, one fresh process each.

    Raises:
        ConfigError: the set lacks a requested point, or its kind is not one this device runs.
    """
    if profile_set.kind not in options.backends:
        raise ConfigError(
            f"the profile set holds {profile_set.kind} artifacts; this device runs {list(options.backends)}"
        )
    results = []
    for point in profile_set.select(widths, batch_sizes):
        result = run_point(profile_set, point, options)
        if result.error:
            log.warning("profile point width %g batch %d failed: %s", point.width_ratio, point.batch_size, result.error)
        else:
            log.info(
                "profile point width %g batch %d: peak %d MiB, %.3f s/step",
                point.width_ratio,
                point.batch_size,
                result.peak_rss_bytes >> 20,
                result.step_time_s,
            )
        results.append(result)
    return results


def profile_report(run_id: str, device_id: str, model_key: str, results: Sequence[PointResult]) -> ProfileReport:
    """The `ProfileReport` of the points that succeeded.

    Raises:
        ProtocolError: an id or a figure does not validate.
    """
    entries = [
        ProfileEntry(
            width_ratio=r.width_ratio,
            batch_size=r.batch_size,
            peak_rss_bytes=r.peak_rss_bytes,
            step_time_s=r.step_time_s,
            peak_uss_bytes=r.peak_uss_bytes,
            backend=r.backend,
            peak_accelerator_bytes=r.peak_accelerator_bytes,
        )
        for r in results
        if not r.error
    ]
    report = ProfileReport(run_id=run_id, device_id=device_id, entries=entries, model_key=model_key)
    _validate(msgspec.json.encode(report))
    return report


def _validate(data: bytes) -> ProfileReport:
    try:
        report = msgspec.json.decode(data, type=ProfileReport)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"invalid profile: {exc}") from exc
    if report.schema_version != SCHEMA_VERSION:
        raise ProtocolError(f"profile of schema version {report.schema_version}; this runtime speaks {SCHEMA_VERSION}")
    return report


def save_profile(path: Path, report: ProfileReport) -> None:
    """Write a profile as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, msgspec.json.format(msgspec.json.encode(report), indent=1))


def load_profile(path: Path) -> ProfileReport | None:
    """Read a saved profile; None when there is none.

    Raises:
        ProtocolError: the file is not a valid profile.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProtocolError(f"cannot read profile {path}: {exc}") from exc
    return _validate(data)


def format_table(results: Sequence[PointResult], budget_bytes: int | None = None) -> list[str]:
    """The profile as text lines: one row per point (MiB, milliseconds).

    `fits` compares the peak RSS plus the GPU's peak with the budget: a Jetson's GPU
    allocates from the board's one RAM.
    """
    mib = 1 << 20
    lines = [
        f"{'backend':>10} {'width':>6} {'batch':>5} {'peak RSS':>9} {'peak USS':>9} {'VmHWM':>8} {'baseline':>9} "
        f"{'GPU':>7} {'ms/step':>8}  fits"
    ]
    for r in results:
        if r.error:
            lines.append(f"{r.backend:>10} {r.width_ratio:6.3f} {r.batch_size:5d}  failed: {r.error}")
            continue
        used = r.peak_rss_bytes + r.peak_accelerator_bytes
        fits = "" if budget_bytes is None else ("yes" if used <= budget_bytes else "NO")
        lines.append(
            f"{r.backend:>10} {r.width_ratio:6.3f} {r.batch_size:5d} {r.peak_rss_bytes / mib:8.0f}M "
            f"{r.peak_uss_bytes / mib:8.0f}M {r.hwm_bytes / mib:7.0f}M {r.baseline_rss_bytes / mib:8.0f}M "
            f"{r.peak_accelerator_bytes / mib:6.0f}M {r.step_time_s * 1000:8.1f}  {fits}"
        )
    return lines


def _child(request_json: str) -> int:
    """The fresh process of one point: measure, print one JSON line."""
    request = json.loads(request_json)
    options = ProfileOptions(
        steps=request["steps"],
        warmup=request["warmup"],
        threads=request["threads"],
        backends=tuple(request["backends"]),
        data_dir=Path(request["data_dir"]) if request["data_dir"] else None,
        timeout_s=request["timeout_s"],
        device=request.get("device", "cpu"),
    )
    try:
        result = measure_point(Path(request["artifact_dir"]), options)
    except MsfusionError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
