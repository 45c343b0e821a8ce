"""The coordinator's run file: TOML tables to frozen dataclasses, flags on top, every mistake named."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from msfusion.algorithm.planning import Strategy
from msfusion.coordinator.fleet.config import load_config
from msfusion.errors import ConfigError
from msfusion.models.config import ContrastiveVariant

RUN = """
run_id = "fmnist"
broker = "mqtt://10.0.0.2:1884"
insecure = true
out = "runs/x"
[engine]
rounds = 7
[engine.model]
arch = "cnn"
channels = [8, 16, 32]
[engine.plan]
strategy = "fedrolex"
round_shift = "1/8"
[engine.loss]
variant = "moon"
mu = 0.2
[round]
deadline_s = 30
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_a_run_file_loads_into_typed_values_and_flags_override_it(tmp_path: Path) -> None:
    # Execute
    config = load_config(_write(tmp_path, RUN), {"rounds": 3, "round.quorum": 1.0, "broker": None})
    # Assert
    assert config.run_id == "fmnist" and config.broker == "mqtt://10.0.0.2:1884" and config.out == Path("runs/x")
    assert config.engine.rounds == 3
    assert config.engine.model.channels == (8, 16, 32)
    assert config.engine.plan.strategy is Strategy.FEDROLEX and config.engine.plan.round_shift == Fraction(1, 8)
    assert config.engine.loss.variant is ContrastiveVariant.MOON and config.engine.loss.mu == 0.2
    assert config.round.deadline_s == 30.0 and config.round.quorum == 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("deadline_s = 30", "deadline = 30"), "unknown key"),
        (('variant = "moon"', 'variant = "mooon"'), "must be one of"),
        (('run_id = "fmnist"', 'run_id = "a/b"'), "not a safe id"),
        (('broker = "mqtt://10.0.0.2:1884"', 'broker = "http://x"'), "scheme"),
        (("rounds = 7", 'rounds = "seven"'), "must be int"),
        (("deadline_s = 30", "deadline_s = 0"), "must be > 0"),
    ],
)
def test_a_bad_run_file_is_refused_with_the_reason(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, RUN.replace(*edit)))


@pytest.mark.parametrize(
    ("broker", "insecure", "refused"),
    [
        ("mqtt://10.0.0.2:1884", False, True),
        ("mqtt://broker.lan", False, True),
        ("mqtt://10.0.0.2:1884", True, False),
        ("mqtts://10.0.0.2:8883", False, False),
        ("mqtt://127.0.0.1:1883", False, False),
        ("mqtt://localhost:1883", False, False),
        ("mqtt://[::1]:1883", False, False),
    ],
)
def test_plain_mqtt_to_another_machine_is_refused_unless_insecure(
    tmp_path: Path, broker: str, insecure: bool, refused: bool
) -> None:
    # Prepare: the run file with this broker and no insecure key
    text = RUN.replace('broker = "mqtt://10.0.0.2:1884"\ninsecure = true', f'broker = "{broker}"')
    overrides = {"insecure": True} if insecure else {}
    # Execute / Assert
    if refused:
        with pytest.raises(ConfigError, match="refusing plain mqtt://.*--insecure"):
            load_config(_write(tmp_path, text), overrides)
    else:
        assert load_config(_write(tmp_path, text), overrides).broker == broker


def test_a_security_folder_needs_a_tls_broker_url(tmp_path: Path) -> None:
    text = RUN.replace('broker = "mqtt://10.0.0.2:1884"', 'broker = "mqtt://127.0.0.1:1883"\nsecurity = "secure"')
    with pytest.raises(ConfigError, match="mqtts://"):
        load_config(_write(tmp_path, text))


def test_a_run_file_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="engine.model"):
        load_config(_write(tmp_path, 'run_id = "x"\n'))


def test_a_data_table_pins_the_runs_preprocessing_and_the_rest_is_agreed_from_the_devices(tmp_path: Path) -> None:
    from msfusion.coordinator.fleet.registry import Fleet
    from msfusion.coordinator.fleet.runner import agree_preprocessing
    from msfusion.models.registry import model_spec
    from msfusion.wire.protocol import Capacity, ChannelStats, DataReport, Registration

    # Prepare: a run file pinning mean and std; two devices reporting their pixels and classes.
    path = tmp_path / "run.toml"
    path.write_text('[engine.model]\narch = "cnn"\n[data]\nmean = [0.5]\nstd = [0.25]\n')
    config = load_config(path)
    fleet = Fleet(model_spec(config.engine.model), config.run_id, "ort", 30.0, inputs=config.engine.model.inputs())
    for device, classes in (("dev000", {"0": 3}), ("dev001", {"4": 2, "9": 1})):
        report = DataReport(
            format="idx",
            task="classification",
            n_samples=sum(classes.values()),
            sample_shape=[1, 28, 28],
            channel_stats=ChannelStats(count=784, mean=[0.1], m2=[9.0]),
            class_counts=classes,
        )
        capacity = Capacity(memory_budget_bytes=1 << 30, cores=1, arch="x86_64", backends=["ort"])
        fleet.register(
            Registration(run_id="run", device_id=device, capacity=capacity, runtime_version="0", data=report), 0
        )
    # Execute
    pinned, agreed = (
        agree_preprocessing(config, fleet),
        agree_preprocessing(load_config(None, {"engine.model": {"arch": "cnn"}}), fleet),
    )
    # Assert: the pinned values win; integer labels below num_classes stay as they are.
    assert pinned is not None and (pinned.mean, pinned.std, pinned.classes) == ([0.5], [0.25], [])
    assert agreed is not None and agreed.mean == [0.1] and agreed.std == pytest.approx([(18.0 / 1568) ** 0.5])
    with pytest.raises(ConfigError, match="one value per channel"):
        path.write_text('[engine.model]\narch = "cnn"\n[data]\nmean = [0.5]\n')
        load_config(path)


def test_an_engine_merge_table_sets_the_merge_defences_and_a_bad_value_is_named(tmp_path: Path) -> None:
    from msfusion.algorithm.merging import Aggregate, MergeConfig, NormAction

    # Prepare
    base = '[engine.model]\narch = "cnn"\n'
    table = '[engine.merge]\nnorm_bound = 5\nnorm_action = "clip"\naggregate = "trimmed_mean"\ntrim = 0.1\n'
    # Execute
    default = load_config(_write(tmp_path, base)).engine.merge
    merge = load_config(_write(tmp_path, base + table)).engine.merge
    # Assert: left out, the default merge (the mean, the 10x reject bound); every key typed
    assert default == MergeConfig()
    assert merge == MergeConfig(norm_bound=5.0, norm_action=NormAction.CLIP, aggregate=Aggregate.TRIMMED_MEAN, trim=0.1)
    for edit, message in (
        (('"trimmed_mean"', '"mode"'), "must be one of"),
        (("norm_bound = 5", "norm_bound = 0.5"), "norm_bound"),
        (("trim = 0.1", "trim = 0.7"), "trim"),
        (("trim = 0.1", "trimm = 0.1"), "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, base + table.replace(*edit)))


def test_asynchronous_rounds_give_devices_until_their_slice_is_too_late(tmp_path: Path) -> None:
    # Prepare
    base = '[engine.model]\narch = "cnn"\n[engine.merge]\nmax_staleness = 3\nstaleness_exponent = 1.0\n'
    # Execute
    sync = load_config(_write(tmp_path, base + "[round]\ndeadline_s = 10\n"))
    late = load_config(_write(tmp_path, base + "[round]\ndeadline_s = 10\nasynchronous = true\n"))
    # Assert: synchronous by default; asynchronous, a task may run until its slice is max_staleness rounds late
    assert not sync.round.asynchronous and sync.round.task_deadline_s(3) == 10.0
    assert late.round.asynchronous and late.round.task_deadline_s(late.engine.merge.max_staleness) == 40.0
    assert late.engine.merge.staleness_weight(3) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="asynchronous"):
        load_config(_write(tmp_path, base + '[round]\nasynchronous = "yes"\n'))
