"""The widest sub-model a kind of board trains, per backend, from per-backend memory models.

What a user asks before buying a board: which width of a model does it train?
The answer joins two things that know nothing of each other: a board
profile (`devices/profiles.py`: its budget, and the backends its
architecture can train) and a fitted memory model per backend
(`memory_model.py`: peak bytes at any width). `devices/` may not import the
coordinator, and the memory model sizes one device by a budget number, so the
join lives here, beside the memory model, as `registry.py` joins profiles of
registered devices to it. The width rule is the coordinator's own
(`largest_affordable_ratio`: the budget less the fleet's safety margin), so
a table built from this says what a fleet would give the board.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Mapping

from msfusion.coordinator.fleet.memory_model import RATIO_STEPS, MemoryModel, largest_affordable_ratio
from msfusion.devices.profiles import BACKENDS, BoardProfile
from msfusion.errors import ConfigError, MemoryBudgetExceeded


class Fit(str, enum.Enum):
    """How a backend's figure for a board came out."""

    FITS = "fits"  # some width fits: `ratio` is the widest
    TOO_SMALL = "too small"  # not even the narrowest sub-model fits the budget
    NOT_MEASURED = "not measured"  # the board can run the backend, but no memory model of it was given
    NOT_OFFERED = "not offered"  # the board's architecture cannot run the backend (no wheel)


@dataclass(frozen=True)
class BoardWidth:
    """One backend's answer for one board and model.

    Attributes:
        backend: the artifact kind.
        fit: which case it is.
        ratio: the widest width ratio that fits, a multiple of 1/1024 (0.0 unless `fit` is FITS).
        predicted_peak_bytes: the prediction at `ratio` (FITS) or at the narrowest width (TOO_SMALL); else 0.
        allowed_bytes: the budget less the safety margin, what the prediction must stay under.
    """

    backend: str
    fit: Fit
    ratio: float = 0.0
    predicted_peak_bytes: int = 0
    allowed_bytes: int = 0


def board_widths(
    profile: BoardProfile,
    models: Mapping[str, MemoryModel],
    batch_size: int,
    safety_margin: float = 0.1,
    budget_bytes: int | None = None,
) -> dict[str, BoardWidth]:
    """The widest width of one model each backend trains on a board, by the backend's memory model.

    Args:
        profile: the board.
        models: backend -> its fitted memory model of the model (a backend left out: not measured).
        batch_size: the batch size the board trains with.
        safety_margin: share of the budget kept free of the predicted peak, in [0, 1)
            (the fleet's `memory_margin`).
        budget_bytes: the runtime's memory budget (default: the profile's `default_memory_budget_bytes`).

    Returns:
        backend -> its answer, for every backend in `BACKENDS`.

    Raises:
        ConfigError: a margin outside [0, 1) or a batch size < 1.
    """
    if not 0.0 <= safety_margin < 1.0 or batch_size < 1:
        raise ConfigError(f"safety_margin must be in [0, 1) and batch_size >= 1, got {safety_margin}, {batch_size}")
    budget = profile.default_memory_budget_bytes if budget_bytes is None else budget_bytes
    allowed = int((1.0 - safety_margin) * budget)
    answers: dict[str, BoardWidth] = {}
    for backend in BACKENDS:
        model = models.get(backend)
        if backend not in profile.available_backends:
            answers[backend] = BoardWidth(backend, Fit.NOT_OFFERED)
        elif model is None:
            answers[backend] = BoardWidth(backend, Fit.NOT_MEASURED)
        else:
            try:
                ratio = largest_affordable_ratio(model, budget, batch_size, safety_margin)
            except MemoryBudgetExceeded:
                narrowest = model.predict(1 / RATIO_STEPS, batch_size)
                answers[backend] = BoardWidth(backend, Fit.TOO_SMALL, 0.0, math.ceil(narrowest), allowed)
                continue
            peak = math.ceil(model.predict(ratio, batch_size))
            answers[backend] = BoardWidth(backend, Fit.FITS, ratio, peak, allowed)
    return answers
