"""Board profiles: the built-ins are right, and a user's TOML file merges in or fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from msfusion.devices.profiles import (
    BACKENDS,
    BUILTIN_PROFILES,
    GIB,
    MIB,
    BoardProfile,
    default_budget,
    get_profile,
    load_profiles,
    manylinux_tags,
    parse_bytes,
)
from msfusion.errors import ConfigError

EXPECTED = {  # name: (arch, RAM GiB, cores, python, glibc)
    "rpi4-2gb": ("aarch64", 2, 4, "3.11", "2.36"),
    "rpi4-4gb": ("aarch64", 4, 4, "3.11", "2.36"),
    "rpi4-8gb": ("aarch64", 8, 4, "3.11", "2.36"),
    "rpi5-4gb": ("aarch64", 4, 4, "3.11", "2.36"),
    "rpi5-8gb": ("aarch64", 8, 4, "3.11", "2.36"),
    "jetson-nano-4gb": ("aarch64", 4, 4, "3.11", "2.27"),
    "jetson-orin-nano-8gb": ("aarch64", 8, 6, "3.10", "2.35"),
    "x86_64-generic": ("x86_64", 8, 4, "3.11", "2.36"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_profile_facts(name: str) -> None:
    profile = BUILTIN_PROFILES[name]
    arch, ram_gib, cores, python, glibc = EXPECTED[name]
    assert (profile.arch, profile.ram_bytes, profile.cores) == (arch, ram_gib * GIB, cores)
    assert (profile.python_minor, profile.glibc) == (python, glibc)
    assert profile.python_tag == "cp" + python.replace(".", "")
    # no onnxruntime-training wheel exists for aarch64; torch (which ExecuTorch's bindings bring) does
    assert profile.backend == ("ort" if arch == "x86_64" else "executorch")
    assert profile.available_backends == (
        ("ort", "executorch", "torch") if arch == "x86_64" else ("executorch", "torch")
    )
    assert profile.backend in profile.available_backends
    assert profile.systemd
    assert profile.platform_tags[0] == f"manylinux_2_{glibc.split('.')[1]}_{arch}"
    assert f"manylinux2014_{arch}" in profile.platform_tags
    assert 0 < profile.default_memory_budget_bytes < profile.memory_max_bytes < profile.ram_bytes


def test_budget_is_ram_less_reserve_times_safety_factor() -> None:
    profile = BUILTIN_PROFILES["rpi4-4gb"]
    expected = int((profile.ram_bytes - profile.os_reserve_bytes) * 0.85) // MIB * MIB
    assert (
        profile.default_memory_budget_bytes == expected == default_budget(profile.ram_bytes, profile.os_reserve_bytes)
    )


def test_jetson_nano_notes_say_what_stock_jetpack_lacks() -> None:
    notes = BUILTIN_PROFILES["jetson-nano-4gb"].notes
    assert "Python 3.6" in notes and "glibc 2.27" in notes and "PYTHON=" in notes


def test_manylinux_tags_are_literal_and_bounded() -> None:
    aarch64 = manylinux_tags("aarch64", "2.28")
    assert aarch64[0] == "manylinux_2_28_aarch64" and aarch64[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in aarch64 and "manylinux_2_16_aarch64" not in aarch64
    assert not any("2010" in t or "manylinux1" in t for t in aarch64)
    x86 = manylinux_tags("x86_64", "2.17")
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"} <= set(x86)
    with pytest.raises(ConfigError):
        manylinux_tags("armv7l", "2.36")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(1024, 1024), ("4 GiB", 4 * GIB), ("512M", 512 * MIB), ("1.5G", 3 * GIB // 2), ("2048", 2048), ("7 B", 7)],
)
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["four GiB", "-1", -5, True, 3.5, "4 PB"])
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(bad)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "boards.toml"
    path.write_text(text)
    return path


def test_user_profiles_merge_with_builtins(tmp_path: Path) -> None:
    # Prepare
    path = _write(
        tmp_path,
        """
[profiles.rpi4-4gb-desktop]
extends = "rpi4-4gb"
os_reserve = "1 GiB"
notes = "with desktop"

[profiles.rock5b-16gb]
arch = "aarch64"
ram = "16 GiB"
cores = 8
os = "armbian-bookworm"
python_version = "3.11"
glibc = "2.36"

[profiles.x86_64-generic]
extends = "x86_64-generic"
cores = 16
""",
    )
    # Execute
    profiles = load_profiles(path)
    # Assert
    assert set(BUILTIN_PROFILES) < set(profiles)
    desktop, parent = profiles["rpi4-4gb-desktop"], BUILTIN_PROFILES["rpi4-4gb"]
    assert (desktop.ram_bytes, desktop.arch, desktop.platform_tags) == (
        parent.ram_bytes,
        "aarch64",
        parent.platform_tags,
    )
    assert desktop.os_reserve_bytes == GIB and desktop.notes == "with desktop"
    assert desktop.default_memory_budget_bytes == default_budget(4 * GIB, GIB) < parent.default_memory_budget_bytes
    rock = profiles["rock5b-16gb"]
    assert (rock.backend, rock.ram_bytes, rock.cores) == ("executorch", 16 * GIB, 8)
    assert rock.platform_tags == manylinux_tags("aarch64", "2.36")
    assert profiles["x86_64-generic"].cores == 16  # the file wins over the built-in
    assert BUILTIN_PROFILES["x86_64-generic"].cores == 4  # built-ins are untouched


@pytest.mark.parametrize("parent", ["jetson-orin-nano-8gb", "x86_64-generic"])
def test_a_profile_may_train_the_torch_backend(tmp_path: Path, parent: str) -> None:
    # Prepare: a board with torch (a Jetson with NVIDIA's build, a PC) that trains torch.export programs
    path = _write(tmp_path, f'[profiles.with-torch]\nextends = "{parent}"\nbackend = "torch"\n')
    # Execute
    profile = get_profile("with-torch", path)
    # Assert: the rest is inherited; the architecture's default backend is left to profiles that do not say
    assert (profile.backend, profile.arch) == ("torch", BUILTIN_PROFILES[parent].arch)
    assert BUILTIN_PROFILES[parent].backend != "torch" and BACKENDS == ("ort", "executorch", "torch")


def test_extends_rederives_tags_when_glibc_changes(tmp_path: Path) -> None:
    path = _write(tmp_path, '[profiles.nano-focal]\nextends = "jetson-nano-4gb"\nglibc = "2.31"\nos = "ubuntu-20.04"\n')
    nano = get_profile("nano-focal", path)
    assert nano.platform_tags[0] == "manylinux_2_31_aarch64" and nano.notes == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[profiles.x\narch = 1", "cannot read"),
        ('[profiles.a]\nextends = "rpi4-4gb"\ncolour = "red"\n', "unknown key 'colour'"),
        ('[profiles.a]\nextends = "rpi9"\n', "unknown profile 'rpi9'"),
        ('[profiles.a]\narch = "aarch64"\ncores = 4\n', "lacks"),
        (
            '[profiles.a]\nextends = "rpi4-4gb"\nbackend = "ort"\n',
            "no aarch64 wheel; use one of ('executorch', 'torch')",
        ),
        ('[profiles.a]\nextends = "rpi4-4gb"\nbackend = "tflite"\n', "backend must be one of"),
        ('[profiles.a]\nextends = "rpi4-4gb"\narch = "riscv64"\n', "arch must be one of"),
        ('[profiles.a]\nextends = "rpi4-4gb"\nmemory_budget = "8 GiB"\n', "exceeds RAM"),
        ('[profiles.a]\nextends = "rpi4-4gb"\npython_version = "3"\n', "python_version"),
        ('[profiles.a]\nextends = "rpi4-4gb"\ncores = 0\n', "cores"),
        ('[profiles.A_B]\nextends = "rpi4-4gb"\n', "name must match"),
        ('[boards.a]\narch = "aarch64"\n', "expected only [profiles"),
        ('[profiles.a]\nextends = "rpi4-4gb"\nram = "4 GiB"\nram_bytes = 1\n', "given twice"),
    ],
)
def test_bad_profile_files_raise_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="boards.toml") as caught:
        load_profiles(_write(tmp_path, text))
    assert message in str(caught.value)


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_profiles("/nonexistent/boards.toml")
    with pytest.raises(ConfigError, match="rpi4-4gb"):  # the known names are listed
        get_profile("rpi3")


def test_profile_validates_on_construction() -> None:
    base = BUILTIN_PROFILES["x86_64-generic"]
    with pytest.raises(ConfigError, match="platform_tags"):
        BoardProfile(**{**base.__dict__, "platform_tags": ("manylinux_2_17_aarch64",)})
