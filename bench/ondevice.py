"""On-device training benchmark: ONNX Runtime Training, ExecuTorch, the torch backend and torch eager side by side.

For each model (cnn, resnet, charlm: the accuracy benchmark's configurations)
at widths 1, 1/2 and 1/4 of every width group, it measures

- export time and artifact size per backend (validation time beside it),
- the weight-transfer size (the sub-model's weights packed as on the wire),
- step time (median over the timed steps, after warm-up steps) and peak RSS
  of local training, for ORT, ExecuTorch, the torch-native backend's .pt2
  program (`torch-export`) and torch eager,

with the local objective of the accuracy benchmark (MOON term on, mu 0.1, by
default) and its optimizers (SGD momentum 0.9 for the image models, AdamW for
the char-LM), batch size 32. Every export and every training run happens in
a fresh subprocess, so no run shares memory or warm caches with another, and
the ONNX Runtime run never imports torch (as on a board). Every runtime
gets the same number of intra-op threads (--threads, default 1).

Peak RSS is reported as the whole process (runtime libraries included:
torch alone is a few hundred MB, ONNX Runtime ~75 MB), beside the RSS once
the runtime is loaded and idle (libraries, sessions, weights set, no step run)
and the training memory above it (peak minus loaded: activations, gradients,
optimizer state, the allocator's arena). With the default, test-sized models
(94k-425k parameters) the runtime's own footprint dominates the whole-process
figure; `--size large` runs larger models where training memory matters, and
`--size board` the char-LM at 101M parameters, a model no single board trains
(the case MSfusion is for), where parameter memory dominates.

It prints a table with ratios to torch eager and the issue's targets, each
marked PASS or MISS (printed, not asserted): A, ORT step time <= 0.8x torch
eager; B, peak RSS at width 1/2 <= 0.35x width 1; C, ExecuTorch step time
<= 1.5x torch eager at the same threads. All figures go to --out as JSON.

    .venv/bin/python bench/ondevice.py --out bench/results/ondevice-quick.json --quick
    .venv/bin/python bench/ondevice.py --out bench/results/ondevice-large.json --quick --size large
    .venv/bin/python bench/ondevice.py --out bench/results/ondevice-board.json --size board --models charlm \
        --widths 1,1/2 --runtimes torch,ort --steps 2 --warmup 1
    .venv/bin/python bench/ondevice.py --out bench/results/ondevice.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Torch-free at import: the ORT worker runs this file as a board would.
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"config": {"arch": "cnn", "channels": [32, 64, 128]}, "optimizer": "sgd", "lr": 0.05, "classes": 10},
    "resnet": {"config": {"arch": "resnet", "channels": [32, 64, 128]}, "optimizer": "sgd", "lr": 0.05, "classes": 10},
    "charlm": {"config": {"arch": "charlm"}, "optimizer": "adamw", "lr": 3e-3, "classes": 81},
}
# --size large: the boards' models are far larger than the test models, and only
# then does training memory (weights, activations, optimizer state) outgrow the
# runtime's own footprint (libraries, sessions, allocator).
LARGE_CONFIGS: dict[str, dict[str, Any]] = {
    "cnn": {"arch": "cnn", "channels": [128, 256, 512]},
    "resnet": {"arch": "resnet", "channels": [64, 128, 256]},
    "charlm": {"arch": "charlm", "d_model": 512, "n_heads": 8, "head_dim": 64, "d_ff": 2048, "n_layers": 4},
}
# --size board: a model no single board can train, the case MSfusion exists for: the char-LM at
# GPT-2-small scale (101M parameters, ~1.2 GB of weights, references and AdamW state at width
# 1), where memory is dominated by the parameters and shrinks with the square of the width.
# Image models have no such size: on 28x28 inputs their activations always dominate.
BOARD_CONFIGS: dict[str, dict[str, Any]] = {
    "charlm": {"arch": "charlm", "d_model": 1024, "n_heads": 16, "head_dim": 64, "d_ff": 4096, "n_layers": 8},
}
SIZES = ("default", "large", "board")
WIDTHS = {"1": 1.0, "1/2": 0.5, "1/4": 0.25}
# torch-native: torch eager with torch's own group_norm/layer_norm kernels in place of the
# models' elementwise norms (written so for ONNX export, not for torch): the fastest torch
# formulation of the same function, so ORT's figure is also shown against the best eager.
# torch-export: the torch-native backend (edge_runtime/backends/torch_native.py), training the
# exported .pt2 program with torch's kernels and autograd, as a board with torch would.
RUNTIMES = ("torch", "torch-native", "ort", "executorch", "torch-export")
# The runtimes that train an exported artifact, and its kind.
ARTIFACT_KINDS = {"ort": "ort", "executorch": "executorch", "torch-export": "torch"}
BATCH = 32


def _run_worker(args: list[str], timeout_s: float, threads: int = 0) -> dict[str, Any]:
    """Run this file as a worker in a fresh interpreter; its last stdout line is JSON."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return {"error": f"worker {args[0]} failed ({proc.returncode}): {tail}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- workers


def _loss_config(loss: str) -> Any:
    from msfusion.models.config import ContrastiveVariant, LossConfig

    return (
        LossConfig(ContrastiveVariant.MOON, mu=0.1, tau=0.5) if loss == "moon" else LossConfig(ContrastiveVariant.OFF)
    )


def _config(name: str, size: str) -> dict[str, Any]:
    if size == "board":
        return dict(BOARD_CONFIGS[name])
    return dict(LARGE_CONFIGS[name] if size == "large" else MODELS[name]["config"])


def _model(name: str, ratio: float, size: str = "default") -> tuple[Any, dict[str, int]]:
    from msfusion.algorithm.spec import widths_for_ratio
    from msfusion.models.config import ModelConfig
    from msfusion.models.registry import model_spec

    cfg = ModelConfig(**_config(name, size))
    return cfg, widths_for_ratio(model_spec(cfg), ratio)


def worker_export(opts: argparse.Namespace) -> dict[str, Any]:
    """Export (and validate) one artifact into opts.dir."""
    import onnxruntime

    from msfusion.export.cache import artifact_key, default_exporter
    from msfusion.export.validate import validate_artifact
    from msfusion.wire.artifacts import ArtifactKind, OptimizerConfig, artifact_bytes

    onnxruntime.set_default_logger_severity(3)
    cfg, widths = _model(opts.model, opts.ratio, opts.size)
    loss = _loss_config(opts.loss)
    kind = ArtifactKind(opts.kind)
    optimizer = OptimizerConfig(MODELS[opts.model]["optimizer"])
    key = artifact_key(cfg, widths, loss, optimizer, BATCH, kind)
    start = time.perf_counter()
    manifest = default_exporter(kind)(cfg, widths, loss, Path(opts.dir), optimizer=optimizer, batch_size=BATCH, key=key)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    report = validate_artifact(Path(opts.dir), cfg, widths, loss)
    return {
        "export_s": export_s,
        "validate_s": time.perf_counter() - start,
        "validate_max_weight_error": report.max_weight_error,
        "artifact_bytes": artifact_bytes(manifest),
    }


def _batches(x_shape: tuple[int, ...], x_dtype: str, y_shape: tuple[int, ...], classes: int, n: int) -> list[Any]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        if x_dtype == "int64":
            x = rng.integers(0, classes, x_shape, dtype=np.int64)
        else:
            x = rng.standard_normal(x_shape).astype(np.float32)
        out.append((x, rng.integers(0, classes, y_shape, dtype=np.int64)))
    return out


def worker_train(opts: argparse.Namespace) -> dict[str, Any]:
    """Train opts.warmup + opts.steps steps in one runtime; report step time and memory."""
    import psutil

    from msfusion.edge_runtime.memory import MemorySampler
    from msfusion.wire.weights import unpack_weights

    work = Path(opts.dir)
    start = unpack_weights((work / "start.safetensors").read_bytes())
    global_ref = unpack_weights((work / "global.safetensors").read_bytes())
    previous = unpack_weights((work / "previous.safetensors").read_bytes())
    classes = MODELS[opts.model]["classes"]
    lr = MODELS[opts.model]["lr"]
    times: list[float] = []
    cpu_times: list[float] = []
    losses: list[float] = []
    _import_runtime(opts.runtime, opts.threads)  # libraries are the baseline; the sampler sees load + training
    with MemorySampler() as sampler:
        torch_runtime = opts.runtime not in ARTIFACT_KINDS
        step = (
            _torch_stepper(opts, start, global_ref, previous)
            if torch_runtime
            else _backend_stepper(opts, start, global_ref, previous)
        )
        # As the edge runtime does (train_local's release_weights): the received weights are freed
        # once the runtime holds its own copies (ExecuTorch keeps the frozen ones as its inputs).
        start = global_ref = previous = {}
        x_shape, x_dtype, y_shape = step.shapes
        batches = _batches(x_shape, x_dtype, y_shape, classes, opts.warmup + opts.steps)
        # Loaded and idle: libraries, sessions (or module + optimizer) and weights in, no step run yet.
        loaded_rss = psutil.Process().memory_info().rss
        for i, (x, y) in enumerate(batches):
            began, began_cpu = time.perf_counter(), time.thread_time()
            losses.append(step(x, y, lr))
            if i >= opts.warmup:
                times.append(time.perf_counter() - began)
                cpu_times.append(time.thread_time() - began_cpu)
    report = sampler.report
    assert report is not None  # noqa: S101 (a benchmark script, not library code)
    return {
        "step_time_s": statistics.median(times),
        "step_time_mean_s": statistics.fmean(times),
        # CPU seconds of the stepping thread: with --threads 1 every runtime computes in it, and
        # unlike wall time it does not count the time other jobs on a shared machine hold the core.
        "step_cpu_s": statistics.median(cpu_times),
        "peak_rss_bytes": report.peak_rss_bytes,
        "baseline_rss_bytes": report.baseline_rss_bytes,
        "growth_bytes": report.growth_bytes,
        "loaded_rss_bytes": loaded_rss,
        "train_bytes": max(0, report.peak_rss_bytes - loaded_rss),
        "peak_uss_bytes": report.peak_uss_bytes,
        "final_loss": losses[-1],
        "torch_loaded": sys.modules.get("torch") is not None,
    }


def _import_runtime(runtime: str, threads: int) -> None:
    if runtime == "ort":
        import msfusion.edge_runtime.backends.ort  # noqa: F401
    elif runtime == "executorch":
        import executorch.extension.training  # noqa: F401

        import msfusion.edge_runtime.backends.executorch  # noqa: F401
    elif runtime == "torch-export":
        import msfusion.edge_runtime.backends.torch_native  # noqa: F401 (torch, not the models)
    else:
        import msfusion.export.validate  # noqa: F401 (torch, the models, the objective)
    if runtime != "ort" and threads > 0:
        import torch

        torch.set_num_threads(threads)


def _backend_stepper(opts: argparse.Namespace, start: Any, global_ref: Any, previous: Any) -> Any:
    from msfusion.edge_runtime.backends.base import make_backend
    from msfusion.wire.artifacts import load_manifest, reference_weights

    artifact = Path(opts.artifact)
    manifest = load_manifest(artifact)
    backend = make_backend(manifest.kind, num_threads=opts.threads)
    backend.load(artifact, manifest)
    backend.set_weights(start, reference_weights(manifest, global_ref, previous))

    def step(x: Any, y: Any, lr: float) -> float:
        return backend.train_step(x, y, lr)

    x_info, y_info = manifest.inputs
    step.shapes = (x_info.shape, x_info.dtype, y_info.shape)  # type: ignore[attr-defined]
    return step


def _native_norms() -> None:
    """Make the models' GroupNorm and LayerNorm call torch's fused kernels (same function, same parameters)."""
    import torch.nn.functional as F

    from msfusion.models import layers

    def group_norm(self: Any, x: Any) -> Any:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def layer_norm(self: Any, x: Any) -> Any:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    layers.GroupNorm.forward = group_norm  # type: ignore[method-assign]
    layers.LayerNorm.forward = layer_norm  # type: ignore[method-assign]


def _torch_stepper(opts: argparse.Namespace, start: Any, global_ref: Any, previous: Any) -> Any:
    import torch

    from msfusion.export.objective import batch_inputs
    from msfusion.models.layers import scale_gradients, scaled_parameters
    from msfusion.models.objective import build_objective, make_optimizer
    from msfusion.wire.artifacts import OptimizerConfig

    if opts.runtime == "torch-native":
        _native_norms()
    cfg, widths = _model(opts.model, opts.ratio, opts.size)
    objective = build_objective(cfg, widths, _loss_config(opts.loss), start, global_ref, previous)
    config = OptimizerConfig(MODELS[opts.model]["optimizer"])
    optimizer = make_optimizer(list(objective.model.parameters()), config, MODELS[opts.model]["lr"])
    compensated = scaled_parameters(objective.model, objective.model.gradient_scales() if config.compensates else {})

    def step(x: Any, y: Any, lr: float) -> float:
        loss = objective(torch.from_numpy(x), torch.from_numpy(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        scale_gradients(compensated)
        optimizer.step()
        return float(loss.detach())

    x_info, y_info = batch_inputs(cfg, BATCH)
    step.shapes = (x_info.shape, x_info.dtype, y_info.shape)  # type: ignore[attr-defined]
    return step


# ---------------------------------------------------------------- driver


def measure(opts: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Every (model, width, runtime) row."""
    from msfusion.export.objective import random_weights
    from msfusion.wire.weights import pack_weights

    rows = []
    for model in opts.models:
        for label in opts.widths:
            cfg, widths = _model(model, WIDTHS[label], opts.size)
            work = root / model / label.replace("/", "_")
            work.mkdir(parents=True)
            start = random_weights(cfg, widths, seed=1)
            weights_blob = pack_weights(start)
            (work / "start.safetensors").write_bytes(weights_blob)
            (work / "global.safetensors").write_bytes(pack_weights(random_weights(cfg, widths, seed=2)))
            (work / "previous.safetensors").write_bytes(pack_weights(random_weights(cfg, widths, seed=3)))
            common = ["--model", model, "--ratio", str(WIDTHS[label]), "--loss", opts.loss, "--size", opts.size]
            exports: dict[str, dict[str, Any]] = {}
            for runtime, kind in ARTIFACT_KINDS.items():
                if runtime not in opts.runtimes:
                    continue
                artifact = work / kind
                exports[runtime] = _run_worker(["export", *common, "--kind", kind, "--dir", str(artifact)], 1800)
                exports[runtime]["artifact"] = str(artifact)
            # Each repeat runs every runtime once, in turn, so a slow spell of the machine hits
            # all of them alike (figures combined by _combine_runs).
            runs: dict[str, list[dict[str, Any]]] = {runtime: [] for runtime in opts.runtimes}
            for _ in range(opts.repeats):
                for runtime in opts.runtimes:
                    args = ["train", *common, "--runtime", runtime, "--dir", str(work), "--threads", str(opts.threads)]
                    args += ["--steps", str(opts.steps), "--warmup", str(opts.warmup)]
                    export = exports.get(runtime, {})
                    if runtime in ARTIFACT_KINDS:
                        if "error" in export:
                            continue
                        args += ["--artifact", export["artifact"]]
                    runs[runtime].append(_run_worker(args, 1800, opts.threads))
            for runtime in opts.runtimes:
                export = exports.get(runtime, {})
                row = {"model": model, "width": label, "runtime": runtime, "weight_bytes": len(weights_blob)}
                if "error" in export:
                    row["error"] = export["error"]
                else:
                    row.update({k: v for k, v in export.items() if k != "artifact"})
                    row.update(_combine_runs(runs[runtime]))
                rows.append(row)
                print(_format_row(row), flush=True)
    _add_ratios(rows)
    return rows


# Step times across repeats: the fastest run, as timeit advises (other processes on the machine
# only ever add time; this 2-core VM swings 30% from run to run). Every other figure: the median.
TIME_KEYS = ("step_time_s", "step_time_mean_s", "step_cpu_s")


def _cpu() -> dict[str, Any]:
    """The CPU the figures come from: the ratios to torch eager depend on it (MKL and oneDNN favour AVX-512)."""
    cpu: dict[str, Any] = {"model": platform.processor() or "?", "vector": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return cpu
    fields = {key.strip(): value.strip() for key, value in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}
    cpu["model"] = fields.get("model name") or fields.get("Hardware") or cpu["model"]
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    cpu["vector"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "fma", "asimd", "sve"})
    return cpu


def _combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs (see TIME_KEYS); the runs are kept beside it."""
    failed = [run["error"] for run in runs if "error" in run]
    if failed:
        return {"error": failed[0]}
    out: dict[str, Any] = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [run[key] for run in runs]
            out[key] = min(values) if key in TIME_KEYS else statistics.median(values)
    if len(runs) > 1:
        out["step_cpu_median_s"] = statistics.median(run["step_cpu_s"] for run in runs)
        out["repeats"] = runs
    return out


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {(r["model"], r["width"], r["runtime"]): r for r in rows if "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        eager = by_key.get((row["model"], row["width"], "torch"))
        if eager:
            row["step_vs_torch"] = row["step_time_s"] / eager["step_time_s"]
            row["step_cpu_vs_torch"] = row["step_cpu_s"] / eager["step_cpu_s"]
            row["rss_vs_torch"] = row["peak_rss_bytes"] / eager["peak_rss_bytes"]
        native = by_key.get((row["model"], row["width"], "torch-native"))
        if native:
            row["step_vs_torch_native"] = row["step_time_s"] / native["step_time_s"]
            row["step_cpu_vs_torch_native"] = row["step_cpu_s"] / native["step_cpu_s"]
        full = by_key.get((row["model"], "1", row["runtime"]))
        if full:
            row["rss_vs_width1"] = row["peak_rss_bytes"] / full["peak_rss_bytes"]
            row["growth_vs_width1"] = row["growth_bytes"] / max(full["growth_bytes"], 1)
            row["train_vs_width1"] = row["train_bytes"] / max(full["train_bytes"], 1)


STEP_TARGET = 0.8  # ORT step time / torch eager, same sub-model and loss
EXECUTORCH_TARGET = 1.5  # ExecuTorch step time / torch eager (issue 16), same threads
RSS_TARGET = 0.35  # peak RSS at width 1/2 / width 1


def _format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['model']:7} {row['width']:4} {row['runtime']:10} ERROR {row['error'][:200]}"
    export = (
        f"{row['export_s']:7.1f} {row['artifact_bytes'] / 1024:9.0f}" if "export_s" in row else f"{'-':>7} {'-':>9}"
    )
    return (
        f"{row['model']:7} {row['width']:4} {row['runtime']:10} {export} {row['weight_bytes'] / 1024:9.0f} "
        f"{row['step_time_s'] * 1000:9.1f} {row.get('step_vs_torch', float('nan')):6.2f} "
        f"{row['step_cpu_s'] * 1000:8.1f} {row.get('step_cpu_vs_torch', float('nan')):6.2f} "
        f"{row['peak_rss_bytes'] / 2**20:8.0f} {row.get('rss_vs_torch', float('nan')):6.2f} "
        f"{row['loaded_rss_bytes'] / 2**20:8.0f} {row['train_bytes'] / 2**20:9.1f} "
        f"{row.get('rss_vs_width1', float('nan')):6.2f} {row.get('train_vs_width1', float('nan')):8.2f}"
    )


HEADER = (
    f"{'model':7} {'wid':4} {'runtime':10} {'exp_s':>7} {'art_KiB':>9} {'wts_KiB':>9} {'step_ms':>9} {'xtorch':>6} {'cpu_ms':>8} {'xtorch':>6} "
    f"{'rss_MiB':>8} {'xtorch':>6} {'load_MiB':>8} {'train_MiB':>9} {'rss_xw1':>6} {'train_xw1':>8}"
)
LEGEND = (
    "step: median wall time per step (the fastest of --repeats runs); cpu: the same for the CPU time of the stepping thread (with --threads 1, "
    "what the step costs whatever else runs on the machine); rss: whole-process peak RSS; load: RSS with the runtime loaded and idle (libraries, sessions, weights; "
    "no step yet); train: peak minus load (what training itself adds; ExecuTorch allocates its planned activation memory when it "
    "loads the program, so its training memory shows in load); xtorch: ratio to torch eager; "
    "xw1: ratio to width 1 of the same runtime"
)


def _verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def _step_target(rows: list[dict[str, Any]], runtime: str, target: float) -> list[str]:
    """One line per row of `runtime`: its step time / torch eager (wall, CPU) against `target`, then the tally."""
    steps = [r for r in rows if r.get("runtime") == runtime and "step_vs_torch" in r]
    lines = []
    for row in steps:
        lines.append(
            f"  {row['model']:7} width {row['width']:4} wall {row['step_vs_torch']:5.2f}  "
            f"{_verdict(row['step_vs_torch'], target)}   cpu {row['step_cpu_vs_torch']:5.2f}  "
            f"{_verdict(row['step_cpu_vs_torch'], target)}"
            + (
                f"   vs torch-native: wall {row['step_vs_torch_native']:5.2f}  "
                f"{_verdict(row['step_vs_torch_native'], target)}   cpu {row['step_cpu_vs_torch_native']:5.2f}  "
                f"{_verdict(row['step_cpu_vs_torch_native'], target)}"
                if "step_vs_torch_native" in row
                else ""
            )
        )
    passed = sum(r["step_vs_torch"] <= target for r in steps)
    passed_cpu = sum(r["step_cpu_vs_torch"] <= target for r in steps)
    lines.append(f"  -> wall {passed}/{len(steps)} pass; cpu {passed_cpu}/{len(steps)} pass")
    return lines


def print_summary(rows: list[dict[str, Any]]) -> list[str]:
    """The table and the issue's three targets with PASS/MISS, as printed lines."""
    lines = [HEADER] + [_format_row(r) for r in rows] + [LEGEND, ""]
    lines.append(
        f"target A: ORT step time <= {STEP_TARGET:.2f}x torch eager (same sub-model and loss; wall time per step, the median over steps "
        "(fastest of --repeats runs), beside it the same ratio of CPU time per step)"
    )
    lines += _step_target(rows, "ort", STEP_TARGET)
    lines.append(
        f"target B: peak RSS at width 1/2 <= {RSS_TARGET:.2f}x width 1 (the target: whole process; "
        "beside it, for information, the same ratio of training memory above the loaded-and-idle baseline)"
    )
    halves = [r for r in rows if r.get("width") == "1/2" and "rss_vs_width1" in r]
    for row in halves:
        lines.append(
            f"  {row['model']:7} {row['runtime']:10} whole process {row['rss_vs_width1']:5.2f}  "
            f"{_verdict(row['rss_vs_width1'], RSS_TARGET)}   training memory {row['train_vs_width1']:5.2f}  "
            f"{_verdict(row['train_vs_width1'], RSS_TARGET)}"
        )
    passed = sum(r["rss_vs_width1"] <= RSS_TARGET for r in halves)
    passed_train = sum(r["train_vs_width1"] <= RSS_TARGET for r in halves)
    lines.append(f"  -> whole process {passed}/{len(halves)} pass; training memory {passed_train}/{len(halves)} pass")
    lines.append(
        f"target C: ExecuTorch step time <= {EXECUTORCH_TARGET:.2f}x torch eager at the same --threads "
        "(wall time per step, beside it the ratio of CPU time of the stepping thread)"
    )
    lines += _step_target(rows, "executorch", EXECUTORCH_TARGET)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (a few minutes on 2 cores)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of cnn,resnet,charlm")
    parser.add_argument("--widths", default=",".join(WIDTHS), help="comma-separated subset of 1,1/2,1/4")
    parser.add_argument(
        "--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of " + ",".join(RUNTIMES)
    )
    parser.add_argument("--loss", choices=("moon", "off"), default="moon", help="contrastive term (mu 0.1) or plain CE")
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="default",
        help="default: the accuracy benchmark's models (94k-425k parameters); large: larger ones "
        "(cnn channels 128,256,512; resnet 64,128,256; charlm d_model 512, d_ff 2048, 4 layers); "
        "board: a model no board trains alone (charlm only: d_model 1024, d_ff 4096, 8 layers, 101M parameters)",
    )
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 5 quick, 40 full)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="training runs per runtime, taken in turns; step times are the fastest run's, other figures the "
        "median (default 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed steps first, as torch's first steps are slow (default 3 quick, 5 full)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of every runtime (default 1: on a shared machine, spinning thread pools "
        "measure the scheduler, not the kernels); 0 = each runtime's default",
    )
    # Worker mode (internal): one export or one training run in a fresh process.
    parser.add_argument("--worker", choices=("export", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.worker:
        if opts.runtime == "ort":
            # A board has no torch. With torch merely installed, onnxruntime's import-time
            # validation imports it (onnxruntime_validation.py probes ortmodule): +280 MB RSS.
            sys.modules["torch"] = None  # type: ignore[assignment]
        result = worker_export(opts) if opts.worker == "export" else worker_train(opts)
        print(json.dumps(result))
        return 0
    if opts.out is None:
        parser.error("--out is required")
    opts.models = [m for m in opts.models.split(",") if m]
    opts.widths = [w for w in opts.widths.split(",") if w]
    opts.runtimes = [r for r in RUNTIMES if r in opts.runtimes.split(",")]
    unknown = sorted(set(opts.models) - set(MODELS)) + sorted(set(opts.widths) - set(WIDTHS))
    if unknown:
        parser.error(f"unknown models or widths: {unknown}")
    if opts.repeats < 1:
        parser.error("--repeats must be >= 1")
    if opts.size == "board" and set(opts.models) - set(BOARD_CONFIGS):
        parser.error(f"--size board has configurations for {sorted(BOARD_CONFIGS)} only; pass --models charlm")
    opts.steps = opts.steps or (5 if opts.quick else 40)
    opts.warmup = opts.warmup or (3 if opts.quick else 5)

    began = time.perf_counter()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="msfusion-ondevice-") as root:
        rows = measure(opts, Path(root))
    lines = print_summary(rows)
    print("\n".join(lines))
    meta = {
        "quick": opts.quick,
        "size": opts.size,
        "loss": opts.loss,
        "batch_size": BATCH,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "threads": opts.threads,
        "runtimes": opts.runtimes,
        "models": {m: {**MODELS[m], "config": _config(m, opts.size)} for m in opts.models},
        "cpu_count": os.cpu_count(),
        "cpu": _cpu(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "wall_s": time.perf_counter() - began,
    }
    from msfusion.export.versions import runtime_versions
    from msfusion.wire.artifacts import ArtifactKind

    meta["versions"] = {k: v for kind in ArtifactKind for k, v in runtime_versions(kind).items()}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": lines}, indent=1))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
