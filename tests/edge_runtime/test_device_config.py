"""The device config file: TOML to a frozen DeviceConfig, and back (what `simulate` writes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msfusion.edge_runtime.config import DeviceConfig, load_device_config, to_toml
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
