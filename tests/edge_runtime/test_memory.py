"""MemorySampler sees memory allocated while it runs."""

from __future__ import annotations

import gc
import sys
import time

import numpy as np
import pytest

from msfusion.edge_runtime.memory import MemorySampler, read_hwm_bytes


def test_the_sampler_sees_a_64_mib_allocation() -> None:
    # Prepare
    size = 64 << 20
    # Execute
    with MemorySampler(interval_s=0.005) as sampler:
        block = np.ones(size, dtype=np.uint8)  # touched, so resident
        time.sleep(0.05)
        del block
    report = sampler.report
    # Assert
    assert report is not None
    assert report.samples >= 2
    assert report.growth_bytes >= size * 0.9
    assert report.peak_rss_bytes >= report.baseline_rss_bytes + size * 0.9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_the_high_water_mark_catches_a_peak_between_samples() -> None:
    # A sampling interval far longer than the allocation's life: only VmHWM can see it.
    size = 64 << 20
    # No garbage collection inside the window: freeing an earlier test's arrays there would
    # lower the RSS under the reset high-water mark and hide the block (seen once in CI).
    gc.collect()
    gc.disable()
    try:
        with MemorySampler(interval_s=10.0) as sampler:
            block = np.ones(size, dtype=np.uint8)
            del block
    finally:
        gc.enable()
    report = sampler.report
    assert report is not None
    if not report.hwm_reset:
        pytest.skip("this kernel does not allow resetting VmHWM")
    assert read_hwm_bytes() > 0
    assert report.peak_rss_bytes >= report.baseline_rss_bytes + size * 0.9
