"""Wheel tag checks agree with pip's own tag logic; the cross-download sees the board's markers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename as reference_parse

from msfusion.devices.profiles import BACKENDS, BUILTIN_PROFILES
from msfusion.devices.wheelhouse import (
    PURE_SDISTS,
    BundleError,
    WheelSources,
    build_pure_wheels,
    check_wheelhouse,
    download_command,
    marker_environment,
    parse_wheel_filename,
    resolve_wheels,
    wheel_mismatch,
)

RPI = BUILTIN_PROFILES["rpi4-4gb"]
ORIN = BUILTIN_PROFILES["jetson-orin-nano-8gb"]
PC = BUILTIN_PROFILES["x86_64-generic"]

WHEELS = [
    "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
    "numpy-2.2.6-cp310-cp310-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
    "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "psutil-7.2.2-cp36-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl",
    "safetensors-0.8.0-cp310-abi3-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
    "future-1.0-cp312-abi3-manylinux_2_17_aarch64.whl",
    "paho_mqtt-2.2.0-py3-none-any.whl",
    "flatbuffers-25.12.19-py2.py3-none-any.whl",
    "newer-1.0-py312-none-any.whl",
    "torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl",
    "glibc39-1.0-cp311-cp311-manylinux_2_39_aarch64.whl",
    "mac-1.0-cp311-cp311-macosx_11_0_arm64.whl",
    "linux-1.0-cp311-cp311-linux_aarch64.whl",
    "debug-1.0-cp311-cp311d-manylinux_2_17_aarch64.whl",
    "pypy-1.0-pp310-pypy310_pp73-manylinux_2_17_aarch64.whl",
    "built-1.0-1build-cp311-cp311-manylinux_2_17_aarch64.whl",
    "nvidia_nvtx-13.0.85-py3-none-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
]


@pytest.mark.parametrize("profile", [RPI, ORIN, PC], ids=lambda p: p.name)
@pytest.mark.parametrize("filename", WHEELS)
def test_wheel_check_agrees_with_packaging_tags(profile: object, filename: str) -> None:
    # The reference: the tags pip itself accepts for CPython 3.x on the board's platforms.
    minor = int(profile.python_minor.split(".")[1])  # type: ignore[attr-defined]
    platforms = list(profile.platform_tags)  # type: ignore[attr-defined]
    supported = set(cpython_tags((3, minor), platforms=platforms)) | set(
        compatible_tags((3, minor), interpreter=f"cp3{minor}", platforms=platforms)
    )
    expected_fit = bool(reference_parse(filename)[3] & supported)
    # Execute
    reason = wheel_mismatch(filename, profile.python_version, profile.platform_tags)  # type: ignore[attr-defined]
    # Assert
    assert (reason is None) == expected_fit, reason


def test_every_profile_backend_has_an_install() -> None:
    # A bundle installs msfusion[<backend>] and builds PURE_SDISTS[<backend>]: both must exist for each.
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(PURE_SDISTS) == set(BACKENDS) and set(BACKENDS) <= set(extras)
    assert any(req.startswith("torch==") for req in extras["torch"])


def test_parse_wheel_filename() -> None:
    tags = parse_wheel_filename(WHEELS[3])
    assert (tags.name, tags.version, tags.pythons, tags.abis) == ("psutil", "7.2.2", ("cp36",), ("abi3",))
    assert tags.platforms[0] == "manylinux2014_aarch64"
    with pytest.raises(BundleError):
        parse_wheel_filename("numpy-2.4.6.tar.gz")


def test_check_wheelhouse_names_every_misfit(tmp_path: Path) -> None:
    for name in (WHEELS[0], WHEELS[2], "pkg-1.0.tar.gz"):
        (tmp_path / name).write_bytes(b"")
    problems = check_wheelhouse(tmp_path, RPI.python_version, RPI.platform_tags)
    assert len(problems) == 2
    assert "x86_64" in problems[0] and "source distribution" in problems[1]


def test_marker_environment_is_the_boards() -> None:
    env = marker_environment(ORIN, ORIN.python_version)
    assert env["platform_machine"] == "aarch64" and env["python_version"] == "3.10"
    assert env["python_full_version"] == "3.10.12" and env["sys_platform"] == "linux"
    assert marker_environment(PC, "3.11")["python_full_version"] == "3.11.0"


def test_download_command_targets_the_board(tmp_path: Path) -> None:
    command = download_command(
        ["msfusion"], RPI, "3.11.2", tmp_path, WheelSources(extra_index_urls=("https://x/simple",))
    )
    joined = " ".join(command)
    assert "--only-binary=:all:" in command and "--abi cp311" in joined and "--python-version 3.11.2" in joined
    assert command.count("--platform") == len(RPI.platform_tags)
    assert "--extra-index-url https://x/simple" in joined and command[-1] == "msfusion"
    assert json.loads(command[3])["platform_machine"] == "aarch64"


def test_the_pip_runner_really_uses_the_boards_markers(tmp_path: Path) -> None:
    # The runner checks at start-up that pip's markers now see aarch64 (on this x86_64 host).
    command = download_command([], RPI, "3.11", tmp_path, WheelSources())
    proc = subprocess.run(command[:4] + ["--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pip ")


@pytest.mark.slow
@pytest.mark.parametrize("profile", [RPI, ORIN], ids=lambda p: p.name)
def test_executorch_closure_resolves_for_aarch64(profile: object, tmp_path: Path) -> None:
    """The full executorch + torch closure for the board (metadata only: no gigabyte download)."""
    # Prepare: the one pure-Python sdist of the closure, built here
    build_pure_wheels(PURE_SDISTS["executorch"], tmp_path, WheelSources())
    requirements = [
        "executorch==1.5.1",
        "torch==2.13.0",
        "numpy>=1.24",
        "psutil>=5.9",
        "paho-mqtt>=2.0",
        "msgspec>=0.18",
        "safetensors>=0.4",
    ]
    # Execute
    names = resolve_wheels(requirements, profile, profile.python_version, WheelSources(), [tmp_path])  # type: ignore[attr-defined]
    # Assert
    problems = [r for n in names if (r := wheel_mismatch(n, profile.python_version, profile.platform_tags))]  # type: ignore[attr-defined]
    assert not problems
    projects = {parse_wheel_filename(n).name.lower() for n in names}
    assert {"executorch", "torch", "numpy", "msgspec", "psutil", "safetensors", "paho_mqtt"} <= projects
    # markers were evaluated for the board, not for this x86_64 / Python 3.11 host
    assert "coremltools" not in projects and "scikit_learn" not in projects
    assert ("exceptiongroup" in projects) == (profile.python_minor == "3.10")  # type: ignore[attr-defined]
