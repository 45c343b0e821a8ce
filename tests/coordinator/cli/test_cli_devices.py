"""`msfusion devices list | flash | install`: thin wiring over devices/, with named exit codes."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from msfusion.coordinator.cli.main import ExitCode, app
from msfusion.devices.flash import read_manifest
from msfusion.devices.profiles import BUILTIN_PROFILES
from msfusion.edge_runtime.config import load_device_config

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_devices_list_shows_every_profile_with_its_backend_and_budget(tmp_path: Path) -> None:
    (tmp_path / "boards.toml").write_text('[profiles.rock5b]\nextends = "rpi5-8gb"\nram = "16 GiB"\n')
    result = runner.invoke(
        app, ["devices", "list", "--profiles", str(tmp_path / "boards.toml")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == ExitCode.SUCCESS, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert set(rows) == set(BUILTIN_PROFILES) | {"rock5b"}
    assert "executorch" in rows["rpi4-4gb"] and "ort" in rows["x86_64-generic"]
    assert f"{BUILTIN_PROFILES['rpi4-4gb'].default_memory_budget_bytes >> 20} MiB" in rows["rpi4-4gb"]
    bad = runner.invoke(app, ["devices", "list", "--profiles", str(tmp_path / "missing.toml")])
    assert bad.exit_code == ExitCode.CONFIG_ERROR and "cannot read board profiles" in _plain(bad.output)


def test_devices_flash_builds_a_bundle_and_installs_it_into_a_root_filesystem(tmp_path: Path) -> None:
    # Prepare
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (tmp_path / "password").write_text("s3cret\n")
    # Execute
    result = runner.invoke(
        app,
        [
            "devices",
            "flash",
            "--profile",
            "x86_64-generic",
            "--device-id",
            "dev009",
            "--run-id",
            "fmnist",
            "--broker",
            "mqtt://10.0.0.1:1883",
            "--username",
            "dev009",
            "--password-file",
            str(tmp_path / "password"),
            "--memory-budget",
            "1.5 GiB",
            "--no-backend",
            "--out",
            str(tmp_path / "bundle"),
            "--rootfs",
            str(rootfs),
        ],
        env={"COLUMNS": "200"},
    )
    # Assert
    assert result.exit_code == ExitCode.SUCCESS, result.output
    assert "dev009 on x86_64-generic" in _plain(result.output) and "installed into" in _plain(result.output)
    manifest = read_manifest(tmp_path / "bundle")
    assert (manifest.device_id, manifest.backend_included, manifest.memory_budget_bytes) == ("dev009", False, 3 << 29)
    config = load_device_config(rootfs / "etc/msfusion/device.toml")
    assert (config.password, config.username, config.broker) == ("s3cret", "dev009", "mqtt://10.0.0.1:1883")
    # The same bundle again, onto a second card
    second = tmp_path / "second"
    (second / "etc").mkdir(parents=True)
    again = runner.invoke(app, ["devices", "install", "--bundle", str(tmp_path / "bundle"), "--rootfs", str(second)])
    assert again.exit_code == ExitCode.SUCCESS, again.output
    assert (second / "etc/msfusion/device.toml").read_text() == (rootfs / "etc/msfusion/device.toml").read_text()


def test_devices_flash_and_install_refuse_bad_requests_with_named_codes(tmp_path: Path) -> None:
    common = ["--device-id", "d1", "--run-id", "r1", "--broker", "mqtt://h:1883", "--out", str(tmp_path / "b")]
    unknown = runner.invoke(app, ["devices", "flash", "--profile", "no-such-board", *common])
    assert unknown.exit_code == ExitCode.CONFIG_ERROR and "unknown board profile" in _plain(unknown.output)
    both = runner.invoke(app, ["devices", "flash", "--profile", "rpi4-4gb", *common, "--rootfs", "x", "--ssh", "pi@h"])
    assert both.exit_code == ExitCode.CONFIG_ERROR and "not both" in _plain(both.output)
    not_a_bundle = runner.invoke(app, ["devices", "install", "--bundle", str(tmp_path), "--rootfs", str(tmp_path)])
    assert not_a_bundle.exit_code == ExitCode.FLASH_FAILED and "not an msfusion bundle" in _plain(not_a_bundle.output)
    neither = runner.invoke(app, ["devices", "install", "--bundle", str(tmp_path)])
    assert neither.exit_code == ExitCode.CONFIG_ERROR
