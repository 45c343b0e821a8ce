"""Board memory figures: the widest width of each benchmark model every board profile trains, per backend.

    .venv/bin/python bench/boards.py [--inputs bench/results/ondevice-*.json] [--margin 0.1] \\
        [--out bench/results/boards.json] [--markdown]

Nothing is trained here: the figures come from the committed on-device runs
(`bench/ondevice.py`'s JSON: the peak RSS, VmHWM, of one training process per
model, width and runtime, at batch 32). Per backend and model (name, size
and configuration), the peaks at the measured widths are the samples of the
coordinator's memory model (`coordinator/fleet/memory_model.py`: overhead +
bytes per parameter + bytes per activation x batch), fitted as a fleet fits
a profiled board. A model measured at only two widths (the board-sized
char-LM) cannot separate three terms: its overhead is taken from the same
backend's fit of the same architecture at the largest size measured at
three widths, and the JSON says so. Each board then gets, per backend, the
widest width whose predicted peak fits its default budget less the fleet's
margin (`coordinator/fleet/board_widths.py`, the coordinator's own rule).

Cells: a width (1, 1/2, ... or a ratio to 3 digits) and its predicted peak;
"*" marks a width below the narrowest one measured (extrapolated);
"not measured": no run of that backend on that model; "-": the board's
architecture cannot run the backend (no wheel); "none": not even the
narrowest sub-model fits. The runtimes measured are on x86_64.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from msfusion.coordinator.fleet.board_widths import BoardWidth, Fit, board_widths
from msfusion.coordinator.fleet.memory_model import MemoryModel, MemorySample, fit_memory_model
from msfusion.coordinator.fleet.sizing import model_sizes
from msfusion.devices.profiles import BACKENDS, BUILTIN_PROFILES
from msfusion.errors import ConfigError
from msfusion.models.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# bench/ondevice.py's runtimes that are a board backend, and which (its ARTIFACT_KINDS): "torch" and
# "torch-native" there are eager torch, not the torch backend, whose runtime is "torch-export".
BACKEND_OF_RUNTIME = {"ort": "ort", "executorch": "executorch", "torch-export": "torch"}
SIZE_ORDER = {"default": 0, "large": 1, "board": 2}
MODEL_ORDER = {"cnn": 0, "resnet": 1, "charlm": 2}
MIB = 1 << 20


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: its name, the size it was run at and its configuration."""

    name: str
    size: str
    config: str  # canonical JSON of the ModelConfig fields

    @property
    def label(self) -> str:
        return f"{self.name} ({self.size})"

    def model_config(self) -> ModelConfig:
        return ModelConfig(**json.loads(self.config))


@dataclass
class Fitted:
    """A backend's memory model of one benchmark model, and where its figures came from."""

    model: MemoryModel
    samples: list[MemorySample]
    files: list[str]
    overhead_from: str = ""  # "": fitted; else the model whose fitted overhead was taken


def read_samples(paths: list[Path]) -> dict[tuple[str, BenchModel], tuple[list[MemorySample], list[str]]]:
    """(backend, model) -> its measured peaks as memory samples, and the files they came from."""
    found: dict[tuple[str, BenchModel], tuple[list[MemorySample], list[str]]] = {}
    for path in paths:
        run = json.loads(path.read_text())
        meta = run["meta"]
        configs = {
            name: json.dumps(spec["config"], sort_keys=True, separators=(",", ":"))
            for name, spec in meta["models"].items()
        }
        for row in run["rows"]:
            backend = BACKEND_OF_RUNTIME.get(row["runtime"])
            if backend is None or "error" in row or not row.get("peak_rss_bytes"):
                continue
            key = (backend, BenchModel(row["model"], meta["size"], configs[row["model"]]))
            samples, files = found.setdefault(key, ([], []))
            ratio = float(Fraction(row["width"]))
            samples.append(MemorySample(ratio, int(meta["batch_size"]), int(row["peak_rss_bytes"])))
            if _shown(path) not in files:
                files.append(_shown(path))
    return found


def fit_all(
    found: dict[tuple[str, BenchModel], tuple[list[MemorySample], list[str]]],
) -> dict[tuple[str, BenchModel], Fitted]:
    """A memory model per (backend, model) with enough widths; two widths borrow a fitted overhead (see top)."""
    fitted: dict[tuple[str, BenchModel], Fitted] = {}
    by_size = sorted(found, key=lambda key: SIZE_ORDER.get(key[1].size, 9))
    for key in by_size:
        samples, files = found[key]
        try:
            fitted[key] = Fitted(fit_memory_model(samples, model_sizes(key[1].model_config())), samples, files)
        except ConfigError:
            continue
    for key in by_size:
        backend, bench = key
        samples, files = found[key]
        if key in fitted or len({s.width_ratio for s in samples}) < 2:
            continue
        donors = [
            (b, m) for (b, m) in fitted if b == backend and m.name == bench.name and not fitted[(b, m)].overhead_from
        ]
        if not donors:
            continue
        donor = max(donors, key=lambda d: SIZE_ORDER.get(d[1].size, 9))
        overhead = fitted[donor].model.overhead_bytes
        model = fit_memory_model(samples, model_sizes(bench.model_config()), overhead_bytes=overhead)
        fitted[key] = Fitted(model, samples, files, overhead_from=donor[1].label)
    return fitted


def check_borrowed_overhead(fitted: dict[tuple[str, BenchModel], Fitted]) -> list[dict[str, Any]]:
    """How well the two-width rule predicts: for each model fitted on 3 widths with a smaller size of it
    fitted too, refit its two widest with the smaller one's overhead and predict its narrowest."""
    checks = []
    for (backend, bench), f in fitted.items():
        widths = sorted({s.width_ratio for s in f.samples})
        smaller = [
            m
            for (b, m), g in fitted.items()
            if b == backend
            and m.name == bench.name
            and SIZE_ORDER[m.size] < SIZE_ORDER[bench.size]
            and not g.overhead_from
        ]
        if f.overhead_from or len(widths) < 3 or not smaller:
            continue
        donor = fitted[(backend, max(smaller, key=lambda m: SIZE_ORDER[m.size]))]
        kept = [s for s in f.samples if s.width_ratio != widths[0]]
        model = fit_memory_model(kept, f.model.sizes, overhead_bytes=donor.model.overhead_bytes)
        for sample in (s for s in f.samples if s.width_ratio == widths[0]):
            predicted = model.predict(sample.width_ratio, sample.batch_size)
            checks.append(
                {
                    "backend": backend,
                    "model": bench.name,
                    "size": bench.size,
                    "width": sample.width_ratio,
                    "predicted_mib": round(predicted / MIB, 1),
                    "measured_mib": round(sample.peak_bytes / MIB, 1),
                    "relative_error": round(predicted / sample.peak_bytes - 1, 4),
                }
            )
    return checks


def width_text(ratio: float) -> str:
    """1, 1/2, 3/4 for ratios with a small denominator; else the ratio to 3 digits."""
    fraction = Fraction(ratio).limit_denominator(1024)
    return str(fraction) if fraction.denominator <= 16 else f"{ratio:.3f}"


def cell(answer: BoardWidth, narrowest_measured: float) -> dict[str, Any]:
    """One backend's answer as the JSON keeps it and the tables print it ("width", "peak")."""
    extrapolated = answer.fit is Fit.TOO_SMALL or (answer.fit is Fit.FITS and answer.ratio < narrowest_measured)
    peak = f"{answer.predicted_peak_bytes / MIB:,.0f}" + ("*" if extrapolated else "")
    width = {
        Fit.NOT_OFFERED: "-",
        Fit.NOT_MEASURED: "not measured",
        Fit.TOO_SMALL: "none",
        Fit.FITS: width_text(answer.ratio) + ("*" if extrapolated else ""),
    }[answer.fit]
    return {
        "fit": answer.fit.value,
        "ratio": answer.ratio,
        "predicted_peak_mib": round(answer.predicted_peak_bytes / MIB, 1),
        "extrapolated": extrapolated,
        "width": width,
        "peak": peak if answer.fit in (Fit.FITS, Fit.TOO_SMALL) else "",
    }


def cell_text(c: dict[str, Any]) -> str:
    """The README cell: 1/2 (1,464 MiB), none (needs 1,300* MiB), not measured or -."""
    if c["fit"] == Fit.TOO_SMALL.value:
        return f"none (needs {c['peak']} MiB)"
    return f"{c['width']} ({c['peak']} MiB)" if c["peak"] else c["width"]


def build(paths: list[Path], margin: float) -> dict[str, Any]:
    """Every board x model x backend answer, with the fits they came from (the JSON this script writes)."""
    found = read_samples(paths)
    fitted = fit_all(found)
    models = sorted({m for _, m in found}, key=lambda m: (MODEL_ORDER.get(m.name, 9), SIZE_ORDER.get(m.size, 9)))
    batches = {s.batch_size for f in fitted.values() for s in f.samples}
    if not batches:
        raise SystemExit(f"no backend in {BACKEND_OF_RUNTIME} was measured at two widths in {[str(p) for p in paths]}")
    if len(batches) != 1:
        raise SystemExit(f"the runs were measured at batch sizes {sorted(batches)}; this table needs one")
    (batch,) = batches
    fits = [
        {
            "backend": backend,
            "model": bench.name,
            "size": bench.size,
            "config": json.loads(bench.config),
            "params_at_width_1": bench_params(bench),
            "files": f.files,
            "samples": [
                {"width": s.width_ratio, "batch_size": s.batch_size, "peak_mib": round(s.peak_bytes / MIB, 1)}
                for s in f.samples
            ],
            "overhead_mib": round(f.model.overhead_bytes / MIB, 1),
            "bytes_per_param": round(f.model.bytes_per_param, 2),
            "bytes_per_activation": round(f.model.bytes_per_activation, 2),
            "max_relative_error": round(f.model.max_relative_error, 4),
            "overhead_from": f.overhead_from,
        }
        for (backend, bench), f in sorted(fitted.items(), key=lambda kv: _order(kv[0]))
    ]
    rows = []
    for profile in BUILTIN_PROFILES.values():
        for bench in models:
            per_backend = {b: f.model for (b, m), f in fitted.items() if m == bench}
            answers = board_widths(profile, per_backend, batch, margin)
            row: dict[str, Any] = {
                "profile": profile.name,
                "model": bench.name,
                "size": bench.size,
                "params_at_width_1": bench_params(bench),
            }
            for backend in BACKENDS:
                measured = fitted.get((backend, bench))
                narrowest = min(s.width_ratio for s in measured.samples) if measured else 1.0
                row[backend] = cell(answers[backend], narrowest)
            rows.append(row)
    return {
        "meta": {
            "inputs": [_shown(p) for p in paths],
            "measured_on": sorted({json.loads(p.read_text())["meta"].get("machine", "?") for p in paths}),
            "batch_size": batch,
            "safety_margin": margin,
            "budgets_mib": {p.name: p.default_memory_budget_bytes // MIB for p in BUILTIN_PROFILES.values()},
            "backend_of_runtime": BACKEND_OF_RUNTIME,
        },
        "fits": fits,
        "borrowed_overhead_checks": check_borrowed_overhead(fitted),
        # measured, but at one width only: too few to fit, so "not measured" in the table
        "unfitted": [
            {"backend": b, "model": m.name, "size": m.size} for b, m in sorted(set(found) - set(fitted), key=_order)
        ],
        "rows": rows,
    }


def _shown(path: Path) -> str:
    """A path relative to the repository where it is in it (the JSON is committed)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _order(key: tuple[str, BenchModel]) -> tuple[int, int, int]:
    backend, bench = key
    return MODEL_ORDER.get(bench.name, 9), SIZE_ORDER.get(bench.size, 9), BACKENDS.index(backend)


def bench_params(bench: BenchModel) -> int:
    return model_sizes(bench.model_config()).param_count(1.0)


def print_table(result: dict[str, Any]) -> None:
    """The fits, then one line per board and model with each backend's width and predicted peak."""
    meta = result["meta"]
    print(
        f"batch {meta['batch_size']}, margin {meta['safety_margin']:.0%} of the budget; from {', '.join(meta['inputs'])}"
    )
    print("\nmemory models (peak = overhead + a x params + b x activations x batch):")
    for f in result["fits"]:
        borrowed = f"; overhead from {f['overhead_from']}" if f["overhead_from"] else ""
        widths = ", ".join(width_text(s["width"]) for s in f["samples"])
        print(
            f"  {f['backend']:<10} {f['model']} ({f['size']}, {f['params_at_width_1'] / 1e6:.2f}M params): "
            f"{f['overhead_mib']:.0f} MiB + {f['bytes_per_param']:.1f} B/param + {f['bytes_per_activation']:.2f} "
            f"B/activation; widths {widths}; max error {f['max_relative_error']:.1%}{borrowed}"
        )
    for c in result["borrowed_overhead_checks"]:
        print(
            f"  check of the two-width rule: {c['backend']} {c['model']} ({c['size']}) fitted at its two widest "
            f"widths with the smaller size's overhead predicts {c['predicted_mib']:.0f} MiB at "
            f"{width_text(c['width'])}, measured {c['measured_mib']:.0f} ({c['relative_error']:+.1%})"
        )
    header = f"\n{'profile':<22} {'budget':>9} {'model':<16}" + "".join(f" {b:>13} {'peak MiB':>9}" for b in BACKENDS)
    print(header)
    for row in result["rows"]:
        line = f"{row['profile']:<22} {meta['budgets_mib'][row['profile']]:>5} MiB {row['model'] + ' (' + row['size'] + ')':<16}"
        for backend in BACKENDS:
            line += f" {row[backend]['width']:>13} {row[backend]['peak']:>9}"
        print(line)
    for u in result["unfitted"]:
        print(f"  {u['backend']} {u['model']} ({u['size']}): measured at one width only, too few to fit")
    print(
        "\n*: below the narrowest width measured (extrapolated); -: the board's architecture has no wheel of the "
        f"backend; none: not even the narrowest width fits. Peaks measured on {', '.join(meta['measured_on'])}."
    )


def markdown(result: dict[str, Any]) -> str:
    """The README's table: a row per model and backend, a column per board (boards alike share one).

    A backend measured on no board for some models gets one row naming them all, "not measured".
    """
    meta = result["meta"]
    groups: dict[tuple[str, int], list[str]] = {}
    for profile in BUILTIN_PROFILES.values():  # same arch and budget: the same answers
        groups.setdefault((profile.arch, profile.default_memory_budget_bytes), []).append(profile.name)
    heads = [
        ", ".join(f"`{n}`" for n in names) + f" ({meta['budgets_mib'][names[0]]:,} MiB)" for names in groups.values()
    ]
    lines = ["| model | backend | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    by_key = {(r["profile"], r["model"], r["size"]): r for r in result["rows"]}
    unmeasured: dict[str, list[str]] = {}
    params = {(r["model"], r["size"]): r["params_at_width_1"] for r in result["rows"]}
    for model, size in params:
        label = f"{model} ({size}, {params[(model, size)] / 1e6:.2f}M params)"
        for backend in BACKENDS:
            answers = [by_key[(names[0], model, size)][backend] for names in groups.values()]
            if all(a["fit"] in (Fit.NOT_MEASURED.value, Fit.NOT_OFFERED.value) for a in answers):
                unmeasured.setdefault(backend, []).append(f"{model} ({size})")
                continue
            lines.append(f"| {label} | {backend} | " + " | ".join(cell_text(a) for a in answers) + " |")
    every = len(params)
    for backend in (b for b in BACKENDS if b in unmeasured):
        offered = [backend in BUILTIN_PROFILES[names[0]].available_backends for names in groups.values()]
        cells = ["not measured" if o else "-" for o in offered]
        models = "every model" if len(unmeasured[backend]) == every else ", ".join(unmeasured[backend])
        lines.append(f"| {models} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--inputs",
        nargs="+",
        type=Path,
        default=sorted(RESULTS.glob("ondevice-*.json")),
        help="bench/ondevice.py JSON runs (default: every bench/results/ondevice-*.json)",
    )
    parser.add_argument("--margin", type=float, default=0.1, help="share of the budget kept free (fleet.memory_margin)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the README's markdown table")
    args = parser.parse_args(argv)
    result = build(list(args.inputs), args.margin)
    print_table(result)
    if args.markdown:
        print("\n" + markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
