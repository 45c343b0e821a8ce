"""The memory model recovers known coefficients, predicts within 1%, and sizes widths monotonically."""

from __future__ import annotations

import numpy as np
import pytest

from msfusion.coordinator.fleet.memory_model import (
    RATIO_STEPS,
    MemoryModel,
    MemorySample,
    fit_memory_model,
    largest_affordable_ratio,
    samples_from_profile,
)
from msfusion.coordinator.fleet.sizing import ModelSizes, model_sizes
from msfusion.errors import ConfigError, MemoryBudgetExceeded
from msfusion.models.config import ModelConfig
from msfusion.wire.protocol import ProfileEntry

MIB = 1 << 20
TRUE = (350 * MIB, 20.0, 6.0)  # overhead, bytes per parameter, bytes per activation
PROFILED = [(1.0, 32), (0.5, 32), (0.25, 32), (0.125, 32), (0.25, 64)]


def _true_peak(sizes: ModelSizes, ratio: float, batch: int) -> float:
    overhead, per_param, per_activation = TRUE
    return overhead + per_param * sizes.param_count(ratio) + per_activation * sizes.activation_elements(ratio) * batch


def _samples(sizes: ModelSizes, noise: float, seed: int = 0) -> list[MemorySample]:
    rng = np.random.default_rng(seed)
    return [MemorySample(r, b, int(_true_peak(sizes, r, b) * (1 + rng.uniform(-noise, noise)))) for r, b in PROFILED]


@pytest.fixture(scope="module", params=["cnn", "charlm"])
def sizes(request: pytest.FixtureRequest) -> ModelSizes:
    cfg = (
        ModelConfig("cnn", channels=(64, 128, 256))
        if request.param == "cnn"
        else ModelConfig("charlm", d_model=256, d_ff=1024)
    )
    return model_sizes(cfg)


def test_exact_points_recover_the_coefficients(sizes: ModelSizes) -> None:
    model = fit_memory_model(_samples(sizes, noise=0.0), sizes)
    assert (model.overhead_bytes, model.bytes_per_param, model.bytes_per_activation) == pytest.approx(TRUE, rel=1e-4)
    assert model.max_relative_error < 1e-6


def test_noisy_points_predict_unseen_widths_within_one_percent(sizes: ModelSizes) -> None:
    # Prepare: measurements with +-0.5% noise
    model = fit_memory_model(_samples(sizes, noise=0.005, seed=1), sizes)
    # Execute / Assert: widths and batch sizes that were never profiled
    for ratio, batch in [(0.375, 32), (0.75, 32), (0.6, 48), (1.0, 16), (0.2, 128)]:
        assert model.predict(ratio, batch) == pytest.approx(_true_peak(sizes, ratio, batch), rel=0.01)
    assert model.max_relative_error < 0.01


def test_coefficients_stay_nonnegative(sizes: ModelSizes) -> None:
    # A runtime whose peak does not grow with activations (noise would make b negative).
    rng = np.random.default_rng(2)
    samples = [
        MemorySample(r, b, int((200 * MIB + 12.0 * sizes.param_count(r)) * (1 + rng.uniform(-0.01, 0.01))))
        for r, b in PROFILED
    ]
    model = fit_memory_model(samples, sizes)
    assert min(model.overhead_bytes, model.bytes_per_param, model.bytes_per_activation) >= 0.0


def test_fit_needs_enough_distinct_samples(sizes: ModelSizes) -> None:
    with pytest.raises(ConfigError, match=">= 3 samples"):
        fit_memory_model(_samples(sizes, 0.0)[:2], sizes)
    same_batch_two_widths = [
        MemorySample(1.0, 32, 900 * MIB),
        MemorySample(0.5, 32, 500 * MIB),
        MemorySample(0.5, 32, 510 * MIB),
    ]
    with pytest.raises(ConfigError, match="cannot separate"):
        fit_memory_model(same_batch_two_widths, sizes)


def test_a_known_overhead_lets_two_widths_fit_the_other_terms(sizes: ModelSizes) -> None:
    # Prepare: exact peaks at two widths only, the overhead known from another fit of the runtime
    two = [MemorySample(r, 32, int(_true_peak(sizes, r, 32))) for r in (1.0, 0.5)]
    with pytest.raises(ConfigError, match=">= 3 samples"):
        fit_memory_model(two, sizes)
    # Execute
    model = fit_memory_model(two, sizes, overhead_bytes=TRUE[0])
    # Assert: the two free terms are recovered, and an unseen width is predicted
    assert (model.overhead_bytes, model.bytes_per_param, model.bytes_per_activation) == pytest.approx(TRUE, rel=1e-4)
    assert model.predict(0.25, 32) == pytest.approx(_true_peak(sizes, 0.25, 32), rel=1e-4)
    with pytest.raises(ConfigError, match=">= 2 samples"):
        fit_memory_model(two[:1], sizes, overhead_bytes=TRUE[0])
    with pytest.raises(ConfigError, match="below every sample"):
        fit_memory_model(two, sizes, overhead_bytes=float(two[1].peak_bytes))


def test_largest_affordable_ratio_is_the_widest_that_fits(sizes: ModelSizes) -> None:
    model = fit_memory_model(_samples(sizes, 0.0), sizes)
    budget, margin, batch = int(_true_peak(sizes, 0.5, 32) * 1.05), 0.1, 32
    ratio = largest_affordable_ratio(model, budget, batch, margin)
    assert model.predict(ratio, batch) <= (1 - margin) * budget
    wider = [k / RATIO_STEPS for k in range(round(ratio * RATIO_STEPS) + 1, RATIO_STEPS + 1)]
    assert all(model.predict(r, batch) > (1 - margin) * budget for r in wider)
    assert ratio < 0.5  # 5% over the peak at 1/2, less a 10% margin


def test_largest_affordable_ratio_is_monotone_in_budget(sizes: ModelSizes) -> None:
    model = fit_memory_model(_samples(sizes, 0.0), sizes)
    lowest = int(model.predict(1 / RATIO_STEPS, 32) / 0.9) + 1
    budgets = np.linspace(lowest, 2 * model.predict(1.0, 32), 60).astype(int)
    ratios = [largest_affordable_ratio(model, int(b), 32, 0.1) for b in budgets]
    assert ratios == sorted(ratios)
    assert ratios[-1] == 1.0 and ratios[0] < 0.1
    # and monotone (decreasing) in the batch size and the margin
    budget = int(budgets[30])
    by_batch = [largest_affordable_ratio(model, budget, b, 0.1) for b in (8, 16, 32, 64)]
    by_margin = [largest_affordable_ratio(model, budget, 32, m) for m in (0.0, 0.1, 0.2)]
    assert by_batch == sorted(by_batch, reverse=True) and by_margin == sorted(by_margin, reverse=True)


def test_a_budget_too_small_for_any_width_says_by_how_much(sizes: ModelSizes) -> None:
    model = MemoryModel(400 * MIB, 16.0, 4.0, sizes)
    with pytest.raises(MemoryBudgetExceeded, match="narrowest") as caught:
        largest_affordable_ratio(model, 300 * MIB, 32, 0.1)
    assert caught.value.budget_bytes == 300 * MIB and caught.value.peak_bytes > 400 * MIB
    with pytest.raises(ConfigError):
        largest_affordable_ratio(model, 300 * MIB, 32, 1.0)


def test_samples_from_a_profile_report() -> None:
    entries = [ProfileEntry(width_ratio=0.5, batch_size=16, peak_rss_bytes=123 * MIB, step_time_s=0.2)]
    assert samples_from_profile(entries) == [MemorySample(0.5, 16, 123 * MIB)]
    with pytest.raises(ConfigError):
        MemorySample(0.0, 16, 1)
