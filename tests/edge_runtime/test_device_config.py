"""The device config file: TOML to a frozen DeviceConfig, and back (what `simulate` writes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msfusion.data.sources import DataSpec
from msfusion.edge_runtime.config import DeviceConfig, data_spec, load_device_config, to_toml
from msfusion.errors import ConfigError


def test_a_device_config_round_trips_through_toml(tmp_path: Path) -> None:
    # Prepare
    config = DeviceConfig(
        device_id="dev003",
        run_id="fmnist",
        data_dir=Path("/data/s"),
        state_dir=Path("/var/s"),
        memory_budget_bytes=1 << 29,
        broker="mqtt://h:1884",
        username="dev003",
        password='p"w',
        backends=("ort", "executorch"),
        max_width_ratio=0.5,
    )
    path = tmp_path / "device.toml"
    path.write_text(to_toml(config))
    # Execute / Assert
    assert load_device_config(path) == config
    assert load_device_config(path, broker="mqtt://other:1").broker == "mqtt://other:1"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('device_id = "dev/3"', "not a safe id"),
        ("budget = 5", "unknown key"),
        ('backends = ["tflite"]', "backends"),
        ("memory_budget_bytes = 0", "memory_budget_bytes"),
    ],
)
def test_a_bad_device_config_is_refused(tmp_path: Path, line: str, message: str) -> None:
    base = {
        "device_id": '"dev0"',
        "run_id": '"r"',
        "data_dir": '"/d"',
        "state_dir": '"/s"',
        "memory_budget_bytes": "100",
    }
    key = line.split(" = ")[0]
    base[key] = line.split(" = ", 1)[1]
    path = tmp_path / "device.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in base.items()))
    with pytest.raises(ConfigError, match=message):
        load_device_config(path)


def test_a_data_table_names_the_boards_own_data_and_round_trips(tmp_path: Path) -> None:
    # Prepare
    config = DeviceConfig(
        device_id="dev003",
        run_id="photos",
        state_dir=Path("/var/s"),
        memory_budget_bytes=1 << 29,
        data=DataSpec(Path("/srv/photos"), format="images", channels=1, image_size=28),
    )
    path = tmp_path / "device.toml"
    path.write_text(to_toml(config))
    # Execute
    loaded = load_device_config(path)
    # Assert
    assert loaded == config and "[data]" in path.read_text()
    assert data_spec(loaded) == DataSpec(Path("/srv/photos"), format="images", channels=1, image_size=28)
    shard = DeviceConfig(device_id="d", run_id="r", state_dir=Path("/s"), memory_budget_bytes=9, data_dir=Path("/d"))
    assert data_spec(shard) == DataSpec(Path("/d"), format="shard")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('[data]\npath = "/p"\nformat = "tiff"\n', "data format must be one of"),
        ('[data]\npath = "/p"\nchannels = 4\n', "channels must be 1"),
        ('[data]\nformat = "images"\n', "needs a 'path'"),
        ('[data]\npath = "/p"\nsize = 3\n', "unknown key"),
        ("", "data_dir .* or a \\[data\\] table"),
    ],
)
def test_a_bad_data_table_is_refused(tmp_path: Path, data: str, message: str) -> None:
    path = tmp_path / "device.toml"
    path.write_text(f'device_id = "d"\nrun_id = "r"\nstate_dir = "/s"\nmemory_budget_bytes = 100\n{data}')
    with pytest.raises(ConfigError, match=message):
        load_device_config(path)
