"""Which strategy wins for a fleet: the recommendation `msfusion plan` prints, read from measured figures.

The figures are the scaling benchmark's (`bench/scaling.py --export-measured`),
shipped with the package as `measured.json`: per budget and fleet size, the
deployable msfusion model's test accuracy and the best small model's (fedavg-small
or HeteroFL's prefix), each a mean over seeds with its spread. The advice is
the nearest measured point's verdict, never a guess beyond it: msfusion is
recommended only where it beat the best small model by more than the seeds'
spread.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from msfusion.errors import ConfigError
from msfusion.models.config import ModelConfig

MEASURED_FILE = "measured.json"


@dataclass(frozen=True)
class Measured:
    """One measured point: a budget and fleet size, msfusion's deployable model beside the best small model."""

    case: str
    budget: float
    devices: int
    msfusion: float
    msfusion_sd: float
    small: str
    small_accuracy: float
    small_sd: float
    full: float | None
    seeds: int
    rounds: int
    gap_sd: float | None = None  # sd over seeds of the paired difference msfusion - small (None: unpaired)


@dataclass(frozen=True)
class Advice:
    """The recommendation and the figures behind it."""

    strategy: str  # "msfusion" or the best small model ("fedavg-small", "heterofl-prefix")
    reason: str
    basis: Measured | None


def case_of(model: ModelConfig) -> str:
    """The benchmark case a model belongs to: figures of one case say nothing about another."""
    if model.task == "lm":
        return f"shakespeare-charlm-d{model.d_model}-l{model.n_layers}"
    return f"fmnist-{model.arch}-" + "-".join(str(c) for c in model.channels)


def load_measured(path: Path | None = None) -> list[Measured]:
    """The shipped figures (or those at `path`)."""
    text = path.read_text() if path is not None else resources.files(__package__).joinpath(MEASURED_FILE).read_text()
    try:
        return [Measured(**entry) for entry in json.loads(text)["points"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"malformed measured figures: {exc}") from exc


def advise(
    devices: int, budget: float, width_ratio: float, measured: Sequence[Measured], case: str | None = None
) -> Advice:
    """The strategy the nearest measured point (budget first, then fleet size, both on a log scale) favours.

    Args:
        devices: devices in the fleet.
        budget: the share of the full model's parameters one device affords.
        width_ratio: the width that budget gives (share of every group's units).
        measured: the benchmark's points.
        case: only points of this case count (`case_of`); None: every point.
    """
    if devices < 1 or not 0 < budget <= 1 or not 0 < width_ratio <= 1:
        raise ConfigError(f"need devices >= 1, budget and width in (0, 1], got {devices}, {budget}, {width_ratio}")
    if width_ratio * devices < 1:
        return Advice(
            "fedavg-small",
            f"{devices} windows of width {width_ratio:.3f} cover less than every unit of a group: no split "
            "trains the whole model each round; train a small model",
            None,
        )
    if case is not None:
        measured = [m for m in measured if m.case == case]
    if not measured:
        what = f" for {case}" if case else ""
        return Advice("fedavg-small", f"no measured figures{what}: the small model is the safe default", None)

    def distance(m: Measured) -> tuple[float, float]:
        return (abs(math.log(m.budget / budget)), abs(math.log(m.devices / devices)))

    basis = min(measured, key=distance)
    gap = basis.msfusion - basis.small_accuracy
    spread = basis.gap_sd if basis.gap_sd is not None else max(basis.msfusion_sd, basis.small_sd)
    where = (
        f"measured at {basis.devices} devices, budget {basis.budget:.4g} ({basis.case}, {basis.rounds} rounds, "
        f"{basis.seeds} seeds)"
    )
    if gap > spread:
        reason = (
            f"msfusion's deployable model {basis.msfusion:.3f} beat the best small model ({basis.small}) "
            f"{basis.small_accuracy:.3f} by {100 * gap:.1f} points, beyond the seeds' spread "
            f"{100 * spread:.1f}; {where}"
        )
        return Advice("msfusion", reason, basis)
    spread_text = f"spread {100 * spread:.1f}" if math.isfinite(spread) else "one seed: no spread measured"
    verdict = "lost to" if gap < -spread else "did not beat"
    reason = (
        f"msfusion's deployable model {basis.msfusion:.3f} {verdict} the best small model ({basis.small}) "
        f"{basis.small_accuracy:.3f} ({100 * gap:+.1f} points, {spread_text}); {where}"
    )
    return Advice(basis.small, reason, basis)


def to_json(points: Sequence[Measured], meta: dict[str, Any]) -> str:
    """The shipped file's text."""
    from dataclasses import asdict

    return json.dumps({"meta": meta, "points": [asdict(p) for p in points]}, indent=1) + "\n"
