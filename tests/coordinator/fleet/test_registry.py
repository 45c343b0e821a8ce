"""Fleet state: the budget-to-width rule, sizing from profiles, memory caps, registration, liveness."""

from __future__ import annotations

import math

import msgspec
import pytest

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.coordinator.fleet.memory_model import (
    fit_memory_model,
    samples_from_profile,
)
from msfusion.coordinator.fleet.registry import (
    BYTES_PER_PARAM,
    RUNTIME_BYTES,
    Fleet,
    Sizing,
    choose_backend,
    ratio_for_memory,
    ratio_from_profile,
)
from msfusion.coordinator.fleet.sizing import model_sizes
from msfusion.errors import ConfigError, MemoryBudgetExceeded
from msfusion.models.config import ModelConfig
from msfusion.models.registry import model_spec
from msfusion.wire.protocol import (
    Capacity,
    ChannelStats,
    DataReport,
    Heartbeat,
    ProfileEntry,
    ProfileReport,
    Registration,
)

SPEC = model_spec(ModelConfig(arch="cnn", channels=(32, 64, 128)))


def _registration(
    device: str, budget: int, backends: list[str] | None = None, cap: float | None = None
) -> Registration:
    capacity = Capacity(
        memory_budget_bytes=budget, cores=4, arch="aarch64", backends=backends or ["ort"], max_width_ratio=cap
    )
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


# Sizing from a measured profile, and the cap after a memory failure.

MODEL = ModelConfig(arch="cnn", channels=(32, 64, 128))
MIB = 1 << 20
TRUE = (360 * MIB, 4.0, 19.0)  # overhead, bytes per parameter, bytes per activation (like ORT on this machine)


def _sizing(key: str = "cnn-key") -> Sizing:
    return Sizing(model_sizes(MODEL), key, batch_size=64, safety_margin=0.1)


def _profile(key: str = "cnn-key", widths: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)) -> ProfileReport:
    sizes = model_sizes(MODEL)
    overhead, per_param, per_activation = TRUE

    def peak(ratio: float) -> int:
        return int(
            overhead + per_param * sizes.param_count(ratio) + per_activation * sizes.activation_elements(ratio) * 64
        )

    entries = [ProfileEntry(width_ratio=w, batch_size=64, peak_rss_bytes=peak(w), step_time_s=0.1) for w in widths]
    return ProfileReport(run_id="r", device_id="x", entries=entries, model_key=key)


def _profiled(device: str, budget: int, profile: ProfileReport | None) -> Registration:
    return msgspec.structs.replace(_registration(device, budget), profile=profile)


def test_a_profiled_device_gets_the_widest_ratio_whose_predicted_peak_fits_with_the_margin() -> None:
    sizing, profile = _sizing(), _profile()
    predict = fit_memory_model(samples_from_profile(profile.entries), sizing.sizes).predict
    for budget in (450 * MIB, 520 * MIB, 700 * MIB):
        # Execute
        ratio, _ = ratio_from_profile(profile, budget, sizing)
        # Assert: fits with 10% spare; one step wider does not (unless already full)
        assert predict(ratio, 64) <= 0.9 * budget
        assert ratio == 1.0 or predict(ratio + 1 / 1024, 64) > 0.9 * budget
    assert ratio_from_profile(profile, 700 * MIB, sizing)[0] == 1.0
    with pytest.raises(MemoryBudgetExceeded):
        ratio_from_profile(profile, 300 * MIB, sizing)
    with pytest.raises(ConfigError, match="profile is of model 'other'"):
        ratio_from_profile(_profile("other"), 600 * MIB, sizing)
    with pytest.raises(ConfigError, match="needs >= 3 samples"):
        ratio_from_profile(_profile(widths=(1.0, 0.5)), 600 * MIB, sizing)


def test_registration_uses_a_matching_profile_and_falls_back_to_the_budget_rule() -> None:
    # Prepare
    fleet = Fleet(SPEC, "r", "ort", heartbeat_timeout_s=10.0, sizing=_sizing())
    budget = 520 * MIB
    # Execute
    welcomes = [
        fleet.register(_profiled("dev000", budget, _profile()), now=0.0),
        fleet.register(_profiled("dev001", budget, _profile("another-model")), now=0.0),
        fleet.register(_profiled("dev002", budget, None), now=0.0),
        fleet.register(_profiled("dev003", 300 * MIB, _profile()), now=0.0),
    ]
    # Assert
    assert [w.accepted for w in welcomes] == [True, True, True, False]
    assert "narrowest sub-model needs" in welcomes[3].reason
    records = fleet.devices
    assert records["dev000"].sized_by == "profile"
    assert records["dev000"].max_ratio == ratio_from_profile(_profile(), budget, _sizing())[0] < 1.0
    assert (records["dev001"].sized_by, records["dev001"].max_ratio) == ("budget", ratio_for_memory(SPEC, budget))
    assert (records["dev002"].sized_by, records["dev002"].max_ratio) == ("budget", 1.0)
    # Without a Sizing (a coordinator that does not size by profiles) the profile is ignored.
    plain = Fleet(SPEC, "r", "ort", heartbeat_timeout_s=10.0)
    plain.register(_profiled("dev000", budget, _profile()), now=0.0)
    assert plain.devices["dev000"].sized_by == "budget"


def test_a_memory_failure_caps_the_device_at_half_the_width_it_failed_at_for_the_rest_of_the_run() -> None:
    # Prepare
    fleet = Fleet(SPEC, "r", "ort", heartbeat_timeout_s=10.0)
    fleet.register(_registration("dev000", 1 << 30), now=0.0)
    fleet.register(_registration("dev001", 1 << 30), now=0.0)
    # Execute / Assert: halved, halved again, kept through a re-registration, floored at 1/1024
    assert fleet.memory_exceeded("dev000", 1.0) == 0.5
    assert [(d.device_id, d.max_ratio) for d in fleet.participants(1.0)] == [("dev000", 0.5), ("dev001", 1.0)]
    assert fleet.memory_exceeded("dev000", 0.5) == 0.25
    assert fleet.memory_exceeded("dev000", 0.75) == 0.25  # a later, wider failure never raises the cap
    fleet.register(_registration("dev000", 1 << 30), now=2.0)
    assert fleet.width_ratio("dev000") == 0.25
    assert fleet.memory_exceeded("dev001", 1 / 1024) == 1 / 1024
    assert fleet.memory_exceeded("unknown", 0.3) == math.floor(0.3 * 0.5 * 1024) / 1024


def _report(**fields: object) -> DataReport:
    base: dict[str, object] = {
        "format": "images",
        "task": "classification",
        "n_samples": 10,
        "sample_shape": [1, 28, 28],
        "channel_stats": ChannelStats(count=7840, mean=[0.3], m2=[700.0]),
        "class_counts": {"0": 4, "1": 6},
    }
    return DataReport(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        (_report(n_samples=0, fatal="no readable image in /srv/photos"), "no readable image"),
        (_report(sample_shape=[3, 32, 32]), "set [data] channels = 1 and image_size = 28"),
        (_report(task="lm", format="text", sample_shape=[], char_counts={"a": 3}), "holds lm data"),
        (_report(class_counts={str(i): 1 for i in range(11)}), "11 classes, the model has 10 outputs"),
    ],
)
def test_a_device_whose_data_cannot_train_the_model_is_told_why_and_left_out(report: DataReport, reason: str) -> None:
    # Prepare
    fleet = Fleet(SPEC, "r", "ort", 30.0, inputs=ModelConfig(arch="cnn", channels=(32, 64, 128)).inputs())
    good = msgspec.structs.replace(_registration("dev000", 1 << 30), data=_report())
    bad = msgspec.structs.replace(_registration("dev001", 1 << 30), data=report)
    # Execute
    welcomed, refused = fleet.register(good, 0.0), fleet.register(bad, 0.0)
    # Assert
    assert welcomed.accepted and not refused.accepted and reason in refused.reason
    assert [slot.device_id for slot in fleet.participants(0.0)] == ["dev000"]
    assert set(fleet.excluded) == {"dev001"} and set(fleet.data) == {"dev000"}
    # The same device with usable data is admitted again and no longer excluded.
    assert fleet.register(msgspec.structs.replace(bad, data=_report()), 1.0).accepted
    assert fleet.excluded == {} and set(fleet.data) == {"dev000", "dev001"}


# ---------------------------------------------------------------- backend per device


def _two_backend_profile(torch_overhead: int, torch_step_s: float) -> ProfileReport:
    """ORT as `_profile` (0.1 s/step); torch with its own overhead and step time (the same per-element costs)."""
    sizes = model_sizes(MODEL)
    _, per_param, per_activation = TRUE

    def entries(backend: str, overhead: int, step_s: float) -> list[ProfileEntry]:
        out = []
        for width in (1.0, 0.5, 0.25, 0.125):
            peak = (
                overhead + per_param * sizes.param_count(width) + per_activation * sizes.activation_elements(width) * 64
            )
            out.append(ProfileEntry(width, 64, int(peak), step_s * width, backend=backend))
        return out

    ort = [msgspec.structs.replace(e, backend="ort") for e in _profile().entries]
    return ProfileReport(
        run_id="r", device_id="x", entries=ort + entries("torch", torch_overhead, torch_step_s), model_key="cnn-key"
    )


def test_the_fastest_backend_that_fits_the_widest_affordable_ratio_is_chosen() -> None:
    # Prepare: torch steps twice as fast as ORT; it needs 100 MiB more (libtorch)
    profile = _two_backend_profile(TRUE[0] + 100 * MIB, 0.05)
    sizing = _sizing()
    # Execute
    roomy = choose_backend(profile, 2048 * MIB, sizing, ["ort", "torch"])
    tight = choose_backend(profile, 520 * MIB, sizing, ["ort", "torch"])
    # Assert: both fit full width with room to spare -> the faster; tight -> the one that affords the wider model
    assert (roomy.backend, roomy.ratio, roomy.step_time_s) == ("torch", 1.0, 0.05)
    assert roomy.ratios == {"ort": 1.0, "torch": 1.0}
    assert roomy.predicted_peak_bytes <= 0.9 * 2048 * MIB
    assert tight.backend == "ort" and tight.ratios["torch"] < tight.ratio == tight.ratios["ort"]
    assert tight.ratio == ratio_from_profile(_profile(), 520 * MIB, sizing)[0]
    # Only the candidates count, and a candidate without points is skipped
    assert choose_backend(profile, 2048 * MIB, sizing, ["ort"]).backend == "ort"
    assert choose_backend(profile, 2048 * MIB, sizing, ["executorch", "ort"]).backend == "ort"
    with pytest.raises(ConfigError, match="no usable points"):
        choose_backend(profile, 2048 * MIB, sizing, ["executorch"])


def test_registration_records_the_chosen_pinned_or_default_backend() -> None:
    # Prepare
    fleet = Fleet(SPEC, "r", "ort", heartbeat_timeout_s=10.0, sizing=_sizing(), backends=("ort", "torch"))
    profile = _two_backend_profile(TRUE[0] + 100 * MIB, 0.05)
    both = ["ort", "torch"]

    def register(device: str, backends: list[str], pinned: str = "", with_profile: bool = True) -> bool:
        msg = _profiled(device, 2048 * MIB, profile if with_profile else None)
        capacity = msgspec.structs.replace(msg.capacity, backends=backends, pinned_backend=pinned)
        return fleet.register(msgspec.structs.replace(msg, capacity=capacity), now=0.0).accepted

    # Execute
    accepted = [
        register("dev000", both),
        register("dev001", both, pinned="ort"),
        register("dev002", both, with_profile=False),
        register("dev003", ["torch"], with_profile=False),
        register("dev004", ["executorch"]),
        register("dev005", both, pinned="executorch"),
    ]
    # Assert
    assert accepted == [True, True, True, True, False, False]
    chosen = {d: (r.backend, r.backend_chosen_by) for d, r in fleet.devices.items()}
    assert chosen == {
        "dev000": ("torch", "profile"),
        "dev001": ("ort", "pinned"),
        "dev002": ("ort", "default"),
        "dev003": ("torch", "default"),
    }
    assert fleet.devices["dev000"].step_time_s == 0.05 and fleet.devices["dev000"].predicted_peak_bytes > 0
    assert fleet.devices["dev002"].step_time_s == 0.0
    assert "pins backend 'executorch'" in fleet.refused["dev005"]
    assert [fleet.backend_of(d) for d in ("dev000", "dev003", "unknown")] == ["torch", "torch", "ort"]
