"""Flashing: bundles for x86_64 and aarch64, an install into a root filesystem, and the SSH commands."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from msfusion.coordinator.security import SecurityDir
from msfusion.data.shards import write_shard
from msfusion.devices import units
from msfusion.devices.flash import (
    BundleManifest,
    BundleOptions,
    DeviceSettings,
    SshTarget,
    build_bundle,
    device_config,
    install_bundle,
    install_over_ssh,
    read_manifest,
    rootfs_arch,
    ssh_commands,
)
from msfusion.devices.profiles import BUILTIN_PROFILES, MIB
from msfusion.devices.wheelhouse import BundleError
from msfusion.edge_runtime.config import load_device_config
from msfusion.errors import ConfigError

PC = BUILTIN_PROFILES["x86_64-generic"]
RPI = BUILTIN_PROFILES["rpi4-4gb"]
DEVICE = DeviceSettings("dev003", "fmnist", "mqtt://192.0.2.10:1883", username="dev003", password="pa ss'word")
CORE = {"msfusion", "numpy", "psutil", "paho_mqtt", "msgspec", "safetensors", "pillow", "cryptography", "cffi"}
CORE |= {"pycparser", "pip"}
SECRET_FILES = ("ca.pem", "device.pem", "device.key")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def secure_device(security: SecurityDir) -> DeviceSettings:
    """DEVICE over TLS with everything `msfusion devices flash --security` puts in a bundle."""
    creds = security.enroll("dev003")
    assert creds.result_key is not None
    return DeviceSettings(
        "dev003",
        "fmnist",
        "mqtts://192.0.2.10:8883",
        ca_cert=creds.ca,
        tls_cert=creds.cert,
        tls_key=creds.key,
        task_signing_public_key=security.task_signing_public_key.read_text(),
        result_key=creds.result_key.read_text().strip(),
    )


@pytest.fixture(scope="module")
def pc_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BundleManifest]:
    """An x86_64 core-only bundle for a TLS broker (CA, certificate, keys) that ships a small data shard."""
    base = tmp_path_factory.mktemp("pc")
    x = np.arange(6 * 28 * 28, dtype=np.float32).reshape(6, 1, 28, 28)
    write_shard(base / "shard", x, np.arange(6, dtype=np.int64), {"name": "dev003", "task": "classification"})
    out = base / "bundle"
    device = secure_device(SecurityDir.init(base / "security", ["192.0.2.10"]))
    return out, build_bundle(PC, device, out, BundleOptions(include_backend=False, shard_dir=base / "shard"))


@pytest.fixture(scope="module")
def rpi_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BundleManifest]:
    out = tmp_path_factory.mktemp("rpi") / "bundle"
    return out, build_bundle(RPI, DEVICE, out, BundleOptions(include_backend=False))


def test_x86_64_bundle_holds_the_core_runtime(pc_bundle: tuple[Path, BundleManifest]) -> None:
    bundle, manifest = pc_bundle
    assert read_manifest(bundle) == manifest
    assert (manifest.arch, manifest.backend, manifest.backend_included) == ("x86_64", "ort", False)
    assert manifest.requirement == "msfusion==0.1.0"
    assert {str(parse_wheel_filename(w.filename)[0]).replace("-", "_") for w in manifest.wheels} == CORE
    assert _mode(bundle) == 0o700 and _mode(bundle / "device.toml") == 0o600
    assert _mode(bundle / "install.sh") == 0o755
    assert "pa ss'word" not in (bundle / "manifest.json").read_text()


def test_aarch64_bundle_wheels_are_for_the_board(rpi_bundle: tuple[Path, BundleManifest]) -> None:
    bundle, manifest = rpi_bundle
    # The reference: every tag pip accepts for CPython 3.11 on the board's platforms.
    supported = set(cpython_tags((3, 11), platforms=list(RPI.platform_tags))) | set(
        compatible_tags((3, 11), interpreter="cp311", platforms=list(RPI.platform_tags))
    )
    names = sorted(p.name for p in (bundle / "wheelhouse").iterdir())
    assert names == sorted(w.filename for w in manifest.wheels)
    native = 0
    for name in names:
        tags = parse_wheel_filename(name)[3]
        assert tags & supported, f"{name} does not install on CPython 3.11 / aarch64"
        assert all(t.platform == "any" or t.platform.endswith("_aarch64") for t in tags), name
        assert all(t.interpreter in ("py3", "cp311") or t.abi == "abi3" for t in tags), name
        native += all(t.platform != "any" for t in tags)
    assert native >= 5  # numpy, msgspec, psutil, safetensors, pillow are compiled for aarch64
    assert manifest.python_version == "3.11.2" and manifest.platform_tags == RPI.platform_tags


def test_device_config_is_what_the_daemon_loads(pc_bundle: tuple[Path, BundleManifest]) -> None:
    # A bundle for a TLS broker: the TLS files in secrets/ (0700, each 0600), the keys in device.toml (0600).
    bundle, manifest = pc_bundle
    config = load_device_config(bundle / "device.toml")
    assert (config.device_id, config.run_id, config.broker) == ("dev003", "fmnist", "mqtts://192.0.2.10:8883")
    assert (config.username, config.password, config.backends, config.mqtt) == (None, None, ("ort",), "5")
    assert config.memory_budget_bytes == PC.default_memory_budget_bytes == manifest.memory_budget_bytes
    on_board = {name: f"{units.SECRETS_DIR}/{name}" for name in SECRET_FILES}
    assert (config.ca_cert, config.tls_cert, config.tls_key) == tuple(on_board.values())
    assert config.task_signing_public_key.startswith("-----BEGIN PUBLIC KEY-----") and len(config.result_key) == 64
    assert _mode(bundle / "device.toml") == 0o600 and _mode(bundle / "secrets") == 0o700
    assert all(_mode(bundle / "secrets" / name) == 0o600 for name in SECRET_FILES)
    assert b"PRIVATE KEY" in (bundle / "secrets" / "device.key").read_bytes()
    assert "PRIVATE" not in (bundle / "manifest.json").read_text()


def test_a_password_bundle_has_no_tls_files(rpi_bundle: tuple[Path, BundleManifest]) -> None:
    bundle, _ = rpi_bundle
    config = load_device_config(bundle / "device.toml")
    assert (config.broker, config.username, config.password) == ("mqtt://192.0.2.10:1883", "dev003", "pa ss'word")
    assert (config.ca_cert, config.task_signing_public_key, config.result_key) == ("", "", "")
    assert not (bundle / "secrets").exists()


def test_a_torch_profile_flashes_the_torch_backend() -> None:
    # A board profile may name the torch backend: its device.toml trains it, its bundle installs msfusion[torch].
    profile = dataclasses.replace(RPI, name="rpi4-4gb-torch", backend="torch")
    assert device_config(profile, DeviceSettings("d1", "r1", "mqtt://h:1883")).backends == ("torch",)


def test_device_config_checks_the_budget_and_ids() -> None:
    assert (
        device_config(
            RPI, DeviceSettings("d1", "r1", "mqtt://h:1883", memory_budget_bytes=512 * MIB)
        ).memory_budget_bytes
        == 512 * MIB
    )
    with pytest.raises(ConfigError, match="exceeds"):
        device_config(RPI, DeviceSettings("d1", "r1", "mqtt://h:1883", memory_budget_bytes=4 << 30))
    with pytest.raises(ConfigError):
        device_config(RPI, DeviceSettings("bad/id", "r1", "mqtt://h:1883"))
    with pytest.raises(ConfigError, match="control character"):
        device_config(RPI, DeviceSettings("d1", "r1", "mqtt://h:1883", password="a\nb"))


def test_units_and_install_script(pc_bundle: tuple[Path, BundleManifest]) -> None:
    bundle, _ = pc_bundle
    unit = (bundle / units.DEVICE_UNIT).read_text()
    assert f"MemoryMax={PC.memory_max_bytes}\n" in unit and "Restart=on-failure\n" in unit
    assert "User=msfusion\n" in unit and "WantedBy=multi-user.target" in unit
    assert (
        "ExecStart=/opt/msfusion/venv/bin/python -m msfusion.edge_runtime --config /etc/msfusion/device.toml\n" in unit
    )
    firstboot = (bundle / units.FIRSTBOOT_UNIT).read_text()
    assert (
        "ConditionPathExists=!/opt/msfusion/venv/bin/python" in firstboot
        and "Before=msfusion-device.service" in firstboot
    )
    script = bundle / "install.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert "--no-index" in script.read_text() and "REQUIREMENT=msfusion==0.1.0" in script.read_text()


def test_install_script_refuses_another_python(pc_bundle: tuple[Path, BundleManifest], tmp_path: Path) -> None:
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\necho 3.9\n")
    fake.chmod(0o755)
    proc = subprocess.run(
        ["sh", str(pc_bundle[0] / "install.sh")],
        env={**os.environ, "MSFUSION_ROOT": str(tmp_path), "PYTHON": str(fake)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "for Python 3.11 but" in proc.stderr


def test_install_into_rootfs_then_build_the_venv_offline(
    pc_bundle: tuple[Path, BundleManifest], tmp_path: Path
) -> None:
    # Prepare: an empty root filesystem
    bundle, manifest = pc_bundle
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    # Execute: flash it, then do what the first boot does (under MSFUSION_ROOT, as this machine is no board)
    install_bundle(bundle, rootfs)
    installed = rootfs / "opt/msfusion/bundle"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(MSFUSION_ROOT=str(rootfs), PYTHON=sys.executable)
    proc = subprocess.run(
        ["sh", str(installed / "install.sh"), "--firstboot"], env=env, capture_output=True, text=True, timeout=300
    )
    # Assert: the flashed files
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(installed) == manifest and _mode(installed) == 0o700
    config = rootfs / "etc/msfusion/device.toml"
    assert _mode(config) == 0o600 and config.read_text() == (bundle / "device.toml").read_text()
    secrets = rootfs / "etc/msfusion/secrets"
    assert _mode(secrets) == 0o700 and sorted(p.name for p in secrets.iterdir()) == sorted(SECRET_FILES)
    for name in SECRET_FILES:
        assert (
            _mode(secrets / name) == 0o600 and (secrets / name).read_bytes() == (bundle / "secrets" / name).read_bytes()
        )
    for unit in (units.DEVICE_UNIT, units.FIRSTBOOT_UNIT):
        assert (rootfs / "etc/systemd/system" / unit).read_text() == (bundle / unit).read_text()
        link = rootfs / "etc/systemd/system/multi-user.target.wants" / unit
        assert link.is_symlink() and os.readlink(link) == f"/etc/systemd/system/{unit}"
    # Assert: the venv built from the wheelhouse alone runs the edge runtime, without torch
    python = rootfs / "opt/msfusion/venv/bin/python"
    check = (
        "import importlib.util, sys\n"
        "from msfusion.wire import protocol, transport, bulk, weights\n"
        "from msfusion.edge_runtime.config import load_device_config\n"
        "from msfusion.data.shards import read_shard\n"
        "c = load_device_config(sys.argv[1]); print(c.device_id, protocol.SCHEMA_VERSION)\n"
        "from msfusion.wire.signing import MessageVerifier, ResultAuthenticator\n"
        "MessageVerifier.from_pem(c.task_signing_public_key); ResultAuthenticator.from_text(c.result_key)\n"
        "assert c.ca_cert == '/etc/msfusion/secrets/ca.pem' and c.broker.startswith('mqtts://'), c\n"
        "x, y, meta = read_shard(sys.argv[2] + str(c.data_dir)); assert x.shape == (6, 1, 28, 28), x.shape\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "print(sys.prefix)\n"
    )
    run = subprocess.run(
        [str(python), "-c", check, str(config), str(rootfs)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "dev003" and run.stdout.split()[-1] == str(rootfs / "opt/msfusion/venv")
    assert (rootfs / "opt/msfusion/venv/bin/msfusion-device").exists()
    assert (rootfs / "var/lib/msfusion/state").is_dir() and _mode(rootfs / "var/lib/msfusion/shard") == 0o700


def test_install_bundle_refuses_a_wrong_target(pc_bundle: tuple[Path, BundleManifest], tmp_path: Path) -> None:
    bundle, _ = pc_bundle
    boot = tmp_path / "boot"
    boot.mkdir()
    with pytest.raises(ConfigError, match="boot partition"):
        install_bundle(bundle, boot)
    arm = tmp_path / "arm"
    (arm / "etc").mkdir(parents=True)
    _fake_elf(arm / "usr/bin/python3.11", 0xB7)
    (arm / "usr/bin/python3").symlink_to("/usr/bin/python3.11")  # absolute: resolved inside the rootfs
    with pytest.raises(ConfigError, match="aarch64 system"):
        install_bundle(bundle, arm)
    with pytest.raises(BundleError, match="not an msfusion bundle"):
        install_bundle(tmp_path, arm)


def _fake_elf(path: Path, machine: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little"))


def test_rootfs_arch(tmp_path: Path) -> None:
    assert rootfs_arch(tmp_path) is None
    _fake_elf(tmp_path / "bin/sh", 0x3E)
    assert rootfs_arch(tmp_path) == "x86_64"
    _fake_elf(tmp_path / "usr/bin/python3", 0xB7)
    assert rootfs_arch(tmp_path) == "aarch64"


def test_ssh_commands(tmp_path: Path) -> None:
    as_pi = ssh_commands(tmp_path / "b", SshTarget("board.local", "pi", port=2222, identity_file=Path("/k/id")))
    assert as_pi == [
        ["ssh", "-p", "2222", "-i", "/k/id", "pi@board.local", "rm -rf /var/tmp/msfusion-bundle"],
        [
            "scp",
            "-r",
            "-p",
            "-P",
            "2222",
            "-i",
            "/k/id",
            str(tmp_path / "b"),
            "pi@board.local:/var/tmp/msfusion-bundle",
        ],
        [
            "ssh",
            "-t",
            "-p",
            "2222",
            "-i",
            "/k/id",
            "pi@board.local",
            "sudo sh /var/tmp/msfusion-bundle/install.sh && rm -rf /var/tmp/msfusion-bundle",
        ],
    ]
    as_root = ssh_commands(tmp_path / "b", SshTarget("10.0.0.2", remote_dir="/tmp/a b"))
    assert as_root[2][-1] == "sh '/tmp/a b'/install.sh && rm -rf '/tmp/a b'" and as_root[0][3] == "root@10.0.0.2"


def test_install_over_ssh_stops_at_the_first_failure(pc_bundle: tuple[Path, BundleManifest]) -> None:
    ran: list[list[str]] = []

    def run(argv: object) -> int:
        ran.append(list(argv))  # type: ignore[call-overload]
        return 0 if len(ran) < 2 else 1

    with pytest.raises(BundleError, match="scp -r -p"):
        install_over_ssh(pc_bundle[0], "board.local", "pi", run=run)
    assert [argv[0] for argv in ran] == ["ssh", "scp"]


def test_build_bundle_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(BundleError, match="not empty"):
        build_bundle(PC, DEVICE, tmp_path, BundleOptions(include_backend=False))


def test_a_failed_build_leaves_no_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="pip download failed") as caught:
        build_bundle(PC, DEVICE, out, BundleOptions(include_backend=False, python_version="3.9"))
    assert "3.10" in str(caught.value)  # pip names msfusion's Requires-Python
    assert not out.exists()
