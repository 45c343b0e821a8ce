"""Fleet state: the budget-to-width rule, registration, liveness from heartbeats and the last will."""

from __future__ import annotations

import pytest

from msfusion.coordinator.models import ModelConfig, model_spec
from msfusion.coordinator.service import BYTES_PER_PARAM, RUNTIME_BYTES, Fleet, ratio_for_memory
from msfusion.coordinator.spec import widths_for_ratio
from msfusion.edge_runtime.protocol import Capacity, Heartbeat, Registration
from msfusion.errors import ConfigError

SPEC = model_spec(ModelConfig(arch="cnn", channels=(32, 64, 128)))


def _registration(device: str, budget: int, backends: list[str] | None = None, cap: float | None = None) -> Registration:
    capacity = Capacity(memory_budget_bytes=budget, cores=4, arch="aarch64", backends=backends or ["ort"], max_width_ratio=cap)
    return Registration(run_id="r", device_id=device, capacity=capacity, runtime_version="0.1.0")


def test_the_width_rule_fits_the_sub_model_into_the_budget_left_after_the_runtime() -> None:
    full = SPEC.param_count()
    for share in (0.05, 0.25, 0.6):
        # Prepare
        budget = RUNTIME_BYTES + int(share * BYTES_PER_PARAM * full)
        # Execute
        ratio = ratio_for_memory(SPEC, budget)
        # Assert: it fits, and one step wider would not.
        assert SPEC.param_count(widths_for_ratio(SPEC, ratio)) <= share * full
        assert SPEC.param_count(widths_for_ratio(SPEC, min(1.0, ratio + 1 / 1024))) > share * full or ratio == 1.0
    assert ratio_for_memory(SPEC, RUNTIME_BYTES + 2 * BYTES_PER_PARAM * full) == 1.0
    assert ratio_for_memory(SPEC, 1 << 40, reported_max=0.25) == 0.25
    with pytest.raises(ConfigError):
        ratio_for_memory(SPEC, RUNTIME_BYTES // 2)


def test_devices_are_admitted_refused_and_ordered_by_id() -> None:
    # Prepare
    fleet = Fleet(SPEC, "r", "ort", heartbeat_timeout_s=10.0)
    # Execute
    welcomes = [
        fleet.register(_registration("dev002", 1 << 30), now=0.0),
        fleet.register(_registration("dev000", 1 << 30, cap=0.5), now=0.0),
        fleet.register(_registration("dev001", 1 << 30, backends=["executorch"]), now=0.0),
        fleet.register(_registration("dev003", 1 << 20), now=0.0),
    ]
    # Assert
    assert [w.accepted for w in welcomes] == [True, True, False, False]
    assert "backend" in welcomes[2].reason and "budget" in welcomes[3].reason
    assert [(d.device_id, d.max_ratio) for d in fleet.participants(1.0)] == [("dev000", 0.5), ("dev002", 1.0)]


def test_a_device_is_offline_after_its_last_will_or_a_silence() -> None:
    # Prepare
    fleet = Fleet(SPEC, "r", "ort", heartbeat_timeout_s=10.0)
    fleet.register(_registration("dev000", 1 << 30), now=0.0)
    fleet.register(_registration("dev001", 1 << 30), now=0.0)
    # Execute
    fleet.heartbeat(Heartbeat(run_id="r", device_id="dev000", state="training", sent_at=1.0), now=8.0)
    fleet.heartbeat(Heartbeat(run_id="r", device_id="dev001", state="offline", sent_at=1.0), now=8.0)
    # Assert
    assert fleet.online("dev000", 12.0) and not fleet.online("dev000", 18.1)
    assert not fleet.online("dev001", 8.0)
    fleet.register(_registration("dev001", 1 << 30), now=9.0)  # it restarted
    assert [d.device_id for d in fleet.participants(12.0)] == ["dev000", "dev001"]
