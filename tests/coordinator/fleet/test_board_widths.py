"""A board's widest width per backend: it fits, the next step up does not, it grows with the budget, and says why not."""

from __future__ import annotations

import numpy as np
import pytest

from msfusion.coordinator.fleet.board_widths import Fit, board_widths
from msfusion.coordinator.fleet.memory_model import RATIO_STEPS, MemoryModel
from msfusion.coordinator.fleet.sizing import ModelSizes
from msfusion.devices.profiles import BACKENDS, BUILTIN_PROFILES
from msfusion.errors import ConfigError

MIB = 1 << 20
BATCH, MARGIN = 32, 0.1
# A tiny synthetic model: 200M parameters and 2M activation elements per sample at width 1.
SIZES = ModelSizes(param_count=lambda r: int(200e6 * r * r), activation_elements=lambda r: int(2e6 * r))
# Two runtimes with their own footprint and costs: one lean, one that needs 400 MiB before any model.
MODELS = {
    "executorch": MemoryModel(400 * MIB, 30.0, 6.0, SIZES),
    "torch": MemoryModel(300 * MIB, 20.0, 10.0, SIZES),
}
PI = BUILTIN_PROFILES["rpi4-4gb"]  # aarch64: ORT is not offered


def test_the_width_fits_and_the_next_step_up_does_not() -> None:
    # Execute: the board's own budget (2.8 GiB); both models need more than that at width 1
    answers = board_widths(PI, MODELS, BATCH, MARGIN)
    allowed = (1 - MARGIN) * PI.default_memory_budget_bytes
    # Assert
    for backend, model in MODELS.items():
        answer = answers[backend]
        assert answer.fit is Fit.FITS and 0.0 < answer.ratio < 1.0
        assert model.predict(answer.ratio, BATCH) <= allowed
        assert answer.predicted_peak_bytes == pytest.approx(model.predict(answer.ratio, BATCH), abs=1)
        k = round(answer.ratio * RATIO_STEPS)
        assert k == answer.ratio * RATIO_STEPS  # a multiple of 1/1024
        assert all(model.predict(j / RATIO_STEPS, BATCH) > allowed for j in range(k + 1, RATIO_STEPS + 1))
    # The analytic answer, by plain numpy: the largest k with a r^2 P + b r A B + c <= allowed.
    model = MODELS["torch"]
    ratios = np.arange(1, RATIO_STEPS + 1) / RATIO_STEPS
    peaks = model.overhead_bytes + 20.0 * np.floor(200e6 * ratios**2) + 10.0 * np.floor(2e6 * ratios) * BATCH
    assert answers["torch"].ratio == ratios[peaks <= allowed].max()


def test_the_width_never_shrinks_as_the_budget_grows() -> None:
    budgets = np.linspace(500 * MIB, 8 << 30, 40).astype(int)
    for backend in MODELS:
        ratios = [board_widths(PI, MODELS, BATCH, MARGIN, int(b))[backend].ratio for b in budgets]
        assert ratios == sorted(ratios)
        assert ratios[0] < ratios[-1] == 1.0


def test_a_budget_below_the_runtimes_own_footprint_gives_none() -> None:
    # 420 MiB less the margin is 378 MiB: below executorch's 400 MiB, above torch's 300 MiB
    answers = board_widths(PI, MODELS, BATCH, MARGIN, budget_bytes=420 * MIB)
    too_small = answers["executorch"]
    assert (too_small.fit, too_small.ratio) == (Fit.TOO_SMALL, 0.0)
    assert too_small.predicted_peak_bytes > too_small.allowed_bytes == int(0.9 * 420 * MIB)
    assert too_small.predicted_peak_bytes > 400 * MIB  # what the narrowest width needs, to say by how much
    assert answers["torch"].fit is Fit.FITS


def test_every_backend_is_answered_and_says_why_not() -> None:
    # ORT cannot run on an aarch64 board even with a model of it; ORT on a PC without one is not measured
    with_ort = {**MODELS, "ort": MemoryModel(80 * MIB, 40.0, 3.0, SIZES)}
    pi, pc = board_widths(PI, with_ort, BATCH), board_widths(BUILTIN_PROFILES["x86_64-generic"], MODELS, BATCH)
    assert set(pi) == set(pc) == set(BACKENDS)
    assert pi["ort"].fit is Fit.NOT_OFFERED and pc["ort"].fit is Fit.NOT_MEASURED
    assert (pi["ort"].ratio, pc["ort"].predicted_peak_bytes) == (0.0, 0)
    # A larger budget (the PC's 6 GiB) gives a wider width of the same model
    assert pc["torch"].ratio > pi["torch"].ratio
    with pytest.raises(ConfigError):
        board_widths(PI, MODELS, BATCH, safety_margin=1.0)
    with pytest.raises(ConfigError):
        board_widths(PI, {}, batch_size=0)
