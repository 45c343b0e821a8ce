"""Board profiles: what a board is (CPU, RAM, OS, Python) and what msfusion installs on it.

A `BoardProfile` names everything the flasher and the planner need to know
about a kind of board without asking the board: its CPU architecture, RAM and
cores, the training backend it gets, the OS conventions (Python version, glibc,
systemd) and the pip platform tags its wheels must carry.

Built-in profiles cover the boards users own (`BUILTIN_PROFILES`); a user adds
or overrides profiles in a TOML file, read by `load_profiles`::

    [profiles.rpi4-4gb-desktop]     # a new name
    extends = "rpi4-4gb"            # start from a built-in (optional)
    os_reserve = "1 GiB"            # the desktop takes more than Lite
    notes = "Raspberry Pi OS with desktop"

    [profiles.rock5b-16gb]
    arch = "aarch64"
    ram = "16 GiB"                  # or ram_bytes = 17179869184
    cores = 8
    os = "armbian-bookworm"
    python_version = "3.11"
    glibc = "2.36"
    # backend = "torch"             # default: "executorch" on aarch64, "ort" on x86_64
    # memory_budget = "12 GiB"      # default: (ram - os_reserve) x 0.85
    # platform_tags = [...]         # default: manylinux tags up to `glibc`

Memory: `memory_max_bytes` (RAM less what the OS keeps) is the hard cap the
systemd unit sets (`MemoryMax`); `default_memory_budget_bytes`, below it by a
safety factor, is what the runtime itself enforces, so a task over budget
fails cleanly before the kernel's OOM killer would act.

Backends: `backend` is the one the bundle installs and device.toml names.
Which others a board could train follows from its architecture alone (which
wheels exist), so it is not a field: `BoardProfile.available_backends`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import tomllib

from msfusion.errors import ConfigError

ARCHS = ("aarch64", "x86_64")
BACKENDS = ("ort", "executorch", "torch")
# onnxruntime-training publishes no aarch64 wheel (1.19.2 has x86_64 only), so
# aarch64 boards train ExecuTorch programs, or torch.export ones with torch's
# kernels ("torch": torch is installed anyway, ExecuTorch's bindings link it).
ARCH_BACKENDS = {"aarch64": ("executorch", "torch"), "x86_64": ("ort", "executorch", "torch")}
DEFAULT_BACKEND = {"aarch64": "executorch", "x86_64": "ort"}
BUDGET_SAFETY_FACTOR = 0.85  # budget = (RAM - OS reserve) x this
GIB = 1 << 30
MIB = 1 << 20

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
_PYTHON = re.compile(r"^3\.(\d+)(\.\d+)?\Z")
_GLIBC = re.compile(r"^2\.(\d+)\Z")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}
# The oldest glibc any manylinux wheel for the arch may target: aarch64 wheels
# start at manylinux2014 (glibc 2.17), x86_64 at manylinux1 (glibc 2.5).
_OLDEST_GLIBC_MINOR = {"aarch64": 17, "x86_64": 5}
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


@dataclass(frozen=True)
class BoardProfile:
    """One kind of board and how msfusion runs on it.

    Attributes:
        name: profile name (lower case; used on the command line).
        arch: CPU architecture as `uname -m` prints it: "aarch64" or "x86_64".
        ram_bytes: installed RAM (nominal; the OS sees a little less).
        cores: CPU cores.
        os: the OS image the profile assumes, e.g. "raspberry-pi-os-bookworm".
        python_version: the CPython the runtime's venv uses, "3.11" or "3.11.2".
        glibc: the OS's glibc version, "2.36"; it bounds the manylinux tags.
        backend: artifact kind the board's bundle installs and trains: "executorch", "ort" or "torch".
        os_reserve_bytes: RAM left to the OS and other services.
        default_memory_budget_bytes: what the runtime may use for a task.
        platform_tags: pip platform tags the board's wheels may carry, best first.
        systemd: the OS boots with systemd (the bundle installs a unit).
        notes: what a user must know before flashing (unsupported stock OS, ...).
    """

    name: str
    arch: str
    ram_bytes: int
    cores: int
    os: str
    python_version: str
    glibc: str
    backend: str
    os_reserve_bytes: int
    default_memory_budget_bytes: int
    platform_tags: tuple[str, ...]
    systemd: bool = True
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "platform_tags", tuple(self.platform_tags))
        where = f"board profile {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"{where}: the name must match {_NAME.pattern}")
        if self.arch not in ARCHS:
            raise ConfigError(f"{where}: arch must be one of {ARCHS}, got {self.arch!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend not in ARCH_BACKENDS[self.arch]:  # only 'ort' (onnxruntime-training) on aarch64
            raise ConfigError(
                f"{where}: backend {self.backend!r} has no {self.arch} wheel; use one of {ARCH_BACKENDS[self.arch]}"
            )
        for key in ("ram_bytes", "cores", "os_reserve_bytes", "default_memory_budget_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "os_reserve_bytes" else 1):
                raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
        if self.os_reserve_bytes >= self.ram_bytes:
            raise ConfigError(f"{where}: os_reserve_bytes {self.os_reserve_bytes} leaves no RAM of {self.ram_bytes}")
        if self.default_memory_budget_bytes > self.memory_max_bytes:
            raise ConfigError(
                f"{where}: memory budget {self.default_memory_budget_bytes} exceeds RAM less the OS reserve "
                f"({self.memory_max_bytes})"
            )
        if not isinstance(self.python_version, str) or not _PYTHON.match(self.python_version):
            raise ConfigError(f"{where}: python_version must look like '3.11' or '3.11.2', got {self.python_version!r}")
        if not isinstance(self.glibc, str) or not _GLIBC.match(self.glibc):
            raise ConfigError(f"{where}: glibc must look like '2.36', got {self.glibc!r}")
        if not self.os or not isinstance(self.os, str):
            raise ConfigError(f"{where}: os must be a non-empty string")
        if not self.platform_tags or any(
            not isinstance(tag, str) or not tag.endswith("_" + self.arch) for tag in self.platform_tags
        ):
            raise ConfigError(
                f"{where}: platform_tags must be non-empty tags ending in _{self.arch}, got {self.platform_tags!r}"
            )

    @property
    def memory_max_bytes(self) -> int:
        """The hard memory cap of the runtime's service (systemd `MemoryMax`)."""
        return self.ram_bytes - self.os_reserve_bytes

    @property
    def available_backends(self) -> tuple[str, ...]:
        """Every backend a board of this architecture can train (wheels exist for it), in `BACKENDS` order."""
        return ARCH_BACKENDS[self.arch]

    @property
    def python_minor(self) -> str:
        """ "3.11" for python_version "3.11.2"."""
        return ".".join(self.python_version.split(".")[:2])

    @property
    def python_tag(self) -> str:
        """The CPython wheel tag, "cp311"."""
        return "cp" + self.python_minor.replace(".", "")


def manylinux_tags(arch: str, glibc: str) -> tuple[str, ...]:
    """Every manylinux platform tag a board with this glibc can install, newest first.

    Args:
        arch: "aarch64" or "x86_64".
        glibc: the board's glibc version, "2.36".

    Returns:
        ("manylinux_2_36_aarch64", ..., "manylinux_2_17_aarch64", "manylinux2014_aarch64").
        pip matches tags literally, so the legacy aliases are listed too.

    Raises:
        ConfigError: unknown arch or malformed glibc version.
    """
    match = _GLIBC.match(glibc) if isinstance(glibc, str) else None
    if arch not in ARCHS or match is None:
        raise ConfigError(f"cannot derive platform tags for arch {arch!r}, glibc {glibc!r}")
    tags: list[str] = []
    for minor in range(int(match.group(1)), _OLDEST_GLIBC_MINOR[arch] - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        legacy = _LEGACY_MANYLINUX.get(minor)
        if legacy is not None and not (legacy == "manylinux2010" and arch != "x86_64"):
            tags.append(f"{legacy}_{arch}")
    return tuple(tags)


def default_budget(ram_bytes: int, os_reserve_bytes: int) -> int:
    """The runtime's default memory budget: (RAM - OS reserve) x `BUDGET_SAFETY_FACTOR`, in whole MiB."""
    return int((ram_bytes - os_reserve_bytes) * BUDGET_SAFETY_FACTOR) // MIB * MIB


def parse_bytes(value: Any, key: str = "size") -> int:
    """A byte count from an integer or a string such as "4 GiB", "512M", "1.5G".

    Units are binary (K = 1024). Raises ConfigError for anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key} must be a byte count or a size such as '4 GiB', got {value!r}")
    unit = (match.group(2) or "").upper()[:1]
    unit = "" if unit == "B" else unit
    return int(float(match.group(1)) * _UNITS[unit])


def _board(
    name: str,
    arch: str,
    ram_gib: int,
    cores: int,
    os: str,
    python: str,
    glibc: str,
    reserve_mib: int,
    notes: str = "",
) -> BoardProfile:
    ram, reserve = ram_gib * GIB, reserve_mib * MIB
    return BoardProfile(
        name=name,
        arch=arch,
        ram_bytes=ram,
        cores=cores,
        os=os,
        python_version=python,
        glibc=glibc,
        backend=DEFAULT_BACKEND[arch],
        os_reserve_bytes=reserve,
        default_memory_budget_bytes=default_budget(ram, reserve),
        platform_tags=manylinux_tags(arch, glibc),
        notes=notes,
    )


# Raspberry Pi OS bookworm (Debian 12): Python 3.11.2, glibc 2.36, systemd 252.
_PI_OS = "raspberry-pi-os-bookworm"
_PI_NOTES = "Needs the 64-bit Raspberry Pi OS (the 32-bit image is armv7l, for which no wheels exist)."
_PI5_NOTES = _PI_NOTES + (
    " Raspberry Pi OS boots the Pi 5 with a 16 KiB-page kernel; should a native wheel fail with a"
    " page-size error, set kernel=kernel8.img in /boot/firmware/config.txt (4 KiB pages)."
)
# JetPack 6 (L4T r36, Ubuntu 22.04): Python 3.10.12, glibc 2.35.
_JETPACK6 = "jetpack-6"
_JETSON_NOTES = (
    "Trains on the CPU cores: PyPI's aarch64 torch is a CUDA 13 build that JetPack 6's CUDA 12 driver "
    "cannot run, and the ExecuTorch training program runs on the CPU anyway."
)
_NANO_NOTES = (
    "Stock JetPack 4.6, the last JetPack for the original Jetson Nano, is Ubuntu 18.04 with Python 3.6 "
    "and glibc 2.27. msfusion needs Python >= 3.10: install a CPython 3.11 (e.g. Miniforge) and run "
    "install.sh with PYTHON=/path/to/python3.11. The torch 2.13 and ExecuTorch 1.5.1 aarch64 wheels "
    "need glibc >= 2.28 (manylinux_2_28), so on stock JetPack 4 only a --no-backend bundle installs; "
    "for training, run an Ubuntu 20.04-based image for the Nano and add a profile with "
    'extends = "jetson-nano-4gb", glibc = "2.31".'
)

BUILTIN_PROFILES: Mapping[str, BoardProfile] = {
    p.name: p
    for p in (
        _board("rpi4-2gb", "aarch64", 2, 4, _PI_OS, "3.11.2", "2.36", 512, _PI_NOTES),
        _board("rpi4-4gb", "aarch64", 4, 4, _PI_OS, "3.11.2", "2.36", 768, _PI_NOTES),
        _board("rpi4-8gb", "aarch64", 8, 4, _PI_OS, "3.11.2", "2.36", 1024, _PI_NOTES),
        _board("rpi5-4gb", "aarch64", 4, 4, _PI_OS, "3.11.2", "2.36", 768, _PI5_NOTES),
        _board("rpi5-8gb", "aarch64", 8, 4, _PI_OS, "3.11.2", "2.36", 1024, _PI5_NOTES),
        # The Nano's 4 GiB is shared with its GPU and JetPack's desktop: a larger reserve.
        _board("jetson-nano-4gb", "aarch64", 4, 4, "jetpack-4.6", "3.11", "2.27", 1536, _NANO_NOTES),
        _board("jetson-orin-nano-8gb", "aarch64", 8, 6, _JETPACK6, "3.10.12", "2.35", 2048, _JETSON_NOTES),
        # A plain Linux PC or VM (Debian 12): for tests and simulated fleets.
        _board("x86_64-generic", "x86_64", 8, 4, "debian-bookworm", "3.11", "2.36", 1024),
    )
}

# TOML keys with a unit-free alternative: "ram = '4 GiB'" or "ram_bytes = 4294967296".
_SIZE_KEYS = {"ram": "ram_bytes", "os_reserve": "os_reserve_bytes", "memory_budget": "default_memory_budget_bytes"}
_FIELDS = {f.name for f in fields(BoardProfile)}


def profile_from_table(name: str, table: Mapping[str, Any], known: Mapping[str, BoardProfile]) -> BoardProfile:
    """Build one profile from its TOML table.

    Args:
        name: the profile's name (the table's key).
        table: its keys (see the module docstring); "extends" names a profile in `known`.
        known: the profiles it may extend.

    Returns:
        The validated profile.

    Raises:
        ConfigError: an unknown key, a missing field, an unknown parent, or an invalid value.
    """
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "extends":
            continue
        if key in _SIZE_KEYS:
            key, value = _SIZE_KEYS[key], parse_bytes(value, f"{name}.{key}")
        elif key in ("ram_bytes", "os_reserve_bytes", "default_memory_budget_bytes"):
            value = parse_bytes(value, f"{name}.{key}")
        elif key not in _FIELDS or key == "name":
            known_keys = sorted((_FIELDS - {"name"}) | set(_SIZE_KEYS) | {"extends"})
            raise ConfigError(f"profile {name!r}: unknown key {key!r}; known: {known_keys}")
        if key in values:
            raise ConfigError(f"profile {name!r}: {key} is given twice")
        values[key] = value
    parent_name = table.get("extends")
    if parent_name is not None:
        parent = known.get(parent_name) if isinstance(parent_name, str) else None
        if parent is None:
            raise ConfigError(f"profile {name!r} extends unknown profile {parent_name!r}; known: {sorted(known)}")
        return _derive(replace(parent, name=name, notes=""), values, inherit=True)
    missing = sorted({"arch", "ram_bytes", "cores", "os", "python_version", "glibc"} - set(values))
    if missing:
        raise ConfigError(f'profile {name!r} lacks {missing} (or give extends = "<profile>")')
    return _derive(None, {"name": name, **values}, inherit=False)


def _derive(parent: BoardProfile | None, values: dict[str, Any], *, inherit: bool) -> BoardProfile:
    """Fill the defaults that follow from other fields (unless the table gave them), then validate."""
    base: dict[str, Any] = {f.name: getattr(parent, f.name) for f in fields(BoardProfile)} if parent else {}
    merged = {**base, **values}
    arch, name = merged.get("arch"), merged.get("name")
    if arch not in ARCHS:
        raise ConfigError(f"board profile {name!r}: arch must be one of {ARCHS}, got {arch!r}")
    # A derived field is re-derived when what it follows from changed and it was not given.
    if "backend" not in values and (not inherit or "arch" in values):
        merged["backend"] = DEFAULT_BACKEND[arch]
    if "platform_tags" not in values and (not inherit or {"arch", "glibc"} & set(values)):
        merged["platform_tags"] = manylinux_tags(arch, merged.get("glibc", ""))
    if "os_reserve_bytes" not in values and not inherit:
        merged["os_reserve_bytes"] = min(GIB, merged["ram_bytes"] // 4)
    if "default_memory_budget_bytes" not in values and (not inherit or {"ram_bytes", "os_reserve_bytes"} & set(values)):
        merged["default_memory_budget_bytes"] = default_budget(merged["ram_bytes"], merged["os_reserve_bytes"])
    try:
        return BoardProfile(**merged)
    except TypeError as exc:
        raise ConfigError(f"board profile {name!r}: {exc}") from exc


def load_profiles(path: str | Path | None = None) -> dict[str, BoardProfile]:
    """The built-in profiles merged with a user's TOML file (the file wins on a name clash).

    Args:
        path: a TOML file with `[profiles.<name>]` tables, or None for the built-ins only.

    Returns:
        name -> profile.

    Raises:
        ConfigError: unreadable or malformed TOML, or an invalid profile (named).
    """
    profiles = dict(BUILTIN_PROFILES)
    if path is None:
        return profiles
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read board profiles {path}: {exc}") from exc
    unknown = sorted(set(document) - {"profiles"})
    tables = document.get("profiles", {})
    if unknown or not isinstance(tables, dict):
        raise ConfigError(f"{path}: expected only [profiles.<name>] tables, found {unknown or 'profiles = ...'}")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: profiles.{name} must be a table")
        try:
            profiles[name] = profile_from_table(name, table, profiles)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return profiles


def get_profile(name: str, path: str | Path | None = None) -> BoardProfile:
    """The profile called `name`, from the built-ins and the optional user file.

    Raises:
        ConfigError: no such profile (the known names are listed), or a bad file.
    """
    profiles = load_profiles(path)
    if name not in profiles:
        raise ConfigError(f"unknown board profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]
