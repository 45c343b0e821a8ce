"""Flashing: build a board's install bundle, then put it on a mounted SD card or a running board.

A bundle is one folder::

    wheelhouse/                 every wheel the runtime needs, for the board's platform and Python
    device.toml                 the device config (mode 0600: it holds the broker password, the result key)
    secrets/                    optional (0700, files 0600): the broker's CA, the device's TLS certificate and key
    msfusion-device.service     the daemon's systemd unit
    msfusion-firstboot.service  finishes an offline install at the first boot
    install.sh                  builds /opt/msfusion/venv from the wheelhouse, offline
    manifest.json               what the bundle is for and holds (no secrets)
    shard/                      optional: the device's data shard

`build_bundle` makes it (the CLI's `msfusion devices flash` calls it);
`install_bundle` copies it into a mounted root filesystem and enables the
units without systemctl; `install_over_ssh` copies it to a running board and
runs install.sh there. `devices/units.py` describes the files on the board.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from msfusion.devices import units
from msfusion.devices.profiles import BoardProfile
from msfusion.devices.wheelhouse import (
    PURE_SDISTS,
    WheelFile,
    WheelSources,
    build_project_wheel,
    build_pure_wheels,
    check_wheelhouse,
    download_wheels,
    list_wheels,
    parse_wheel_filename,
)
from msfusion.edge_runtime.config import DeviceConfig, to_toml
from msfusion.errors import BundleError, ConfigError
from msfusion.progress import ProgressCallback, step

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST = "manifest.json"
CONFIG = "device.toml"
SECRETS = "secrets"
INSTALL_SCRIPT = "install.sh"
_ELF_MACHINE = {0xB7: "aarch64", 0x3E: "x86_64"}  # e_machine of an ELF file


@dataclass(frozen=True)
class DeviceSettings:
    """Who the device is and where it reports: the per-device part of a bundle.

    Attributes:
        device_id: the device's id (its MQTT subtree).
        run_id: the training run it joins.
        broker_url: "mqtt://host:port" of the coordinator's broker.
        username: the device's broker user (the broker's ACL confines it).
        password: its broker password.
        memory_budget_bytes: the runtime's budget (None: the profile's default).
        data_dir: the shard folder on the board.
        state_dir: the state folder on the board.
        max_width_ratio: optional cap the device reports.
        ca_cert: the broker's CA certificate (a local file; shipped in secrets/) for an mqtts:// broker.
        tls_cert, tls_key: the device's client certificate and key (local files; shipped in secrets/).
        task_signing_public_key: the coordinator's task-signing public key (PEM text, written into
            device.toml: the device then obeys only signed tasks, welcomes and stops).
        result_key: the device's result key (hex, written into device.toml: its results are MACed).
    """

    device_id: str
    run_id: str
    broker_url: str
    username: str | None = None
    password: str | None = None
    memory_budget_bytes: int | None = None
    data_dir: str = str(units.STATE_ROOT / "shard")
    state_dir: str = str(units.STATE_ROOT / "state")
    max_width_ratio: float | None = None
    ca_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    task_signing_public_key: str = ""
    result_key: str = ""

    def secrets(self) -> dict[str, Path]:
        """The files shipped in secrets/, by their name on the board."""
        named = {"ca.pem": self.ca_cert, "device.pem": self.tls_cert, "device.key": self.tls_key}
        return {name: path for name, path in named.items() if path is not None}


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle is for and what it holds (manifest.json; no secrets).

    Attributes:
        format_version: `MANIFEST_FORMAT`.
        profile: the board profile's name.
        arch: the board's architecture.
        python_version: the CPython the wheels are for.
        platform_tags: the board's platform tags.
        backend: the board's artifact kind.
        backend_included: False for a `--no-backend` bundle (core runtime only).
        device_id: the device the config is for.
        requirement: what install.sh installs, "msfusion[executorch]==0.1.0".
        memory_budget_bytes: the runtime's budget in device.toml.
        memory_max_bytes: the unit's MemoryMax.
        wheels: every wheel of the wheelhouse.
        created: ISO 8601 UTC time of the build.
    """

    format_version: int
    profile: str
    arch: str
    python_version: str
    platform_tags: tuple[str, ...]
    backend: str
    backend_included: bool
    device_id: str
    requirement: str
    memory_budget_bytes: int
    memory_max_bytes: int
    wheels: tuple[WheelFile, ...]
    created: str

    def to_json(self) -> str:
        """The manifest as JSON text."""
        return json.dumps(asdict(self), indent=2) + "\n"


def read_manifest(bundle_dir: Path) -> BundleManifest:
    """Read and check a bundle's manifest.json.

    Raises:
        BundleError: missing or malformed manifest, or a file it names is missing.
    """
    try:
        raw = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
        raw["platform_tags"] = tuple(raw["platform_tags"])
        raw["wheels"] = tuple(WheelFile(**w) for w in raw["wheels"])
        manifest = BundleManifest(**raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{bundle_dir} is not an msfusion bundle: {exc}") from exc
    if manifest.format_version != MANIFEST_FORMAT:
        raise BundleError(
            f"{bundle_dir}: bundle format {manifest.format_version}, this msfusion reads {MANIFEST_FORMAT}"
        )
    names = [units.DEVICE_UNIT, units.FIRSTBOOT_UNIT, INSTALL_SCRIPT, CONFIG]
    missing = [n for n in names if not (bundle_dir / n).is_file()]
    missing += [w.filename for w in manifest.wheels if not (bundle_dir / "wheelhouse" / w.filename).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir}: bundle lacks {missing}")
    return manifest


def device_config(profile: BoardProfile, device: DeviceSettings) -> DeviceConfig:
    """The daemon's config for this board, validated by the daemon's own loader's rules.

    Raises:
        ConfigError: an invalid id, broker URL or budget, or a budget above the board's cap.
    """
    for name in ("username", "password"):
        value = getattr(device, name)
        if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ConfigError(f"the device's {name} holds a control character")
    budget = device.memory_budget_bytes or profile.default_memory_budget_bytes
    if budget > profile.memory_max_bytes:
        raise ConfigError(
            f"memory budget {budget} exceeds {profile.name}'s RAM less the OS reserve ({profile.memory_max_bytes})"
        )
    return DeviceConfig(
        device_id=device.device_id,
        run_id=device.run_id,
        data_dir=Path(device.data_dir),
        state_dir=Path(device.state_dir),
        memory_budget_bytes=budget,
        broker=device.broker_url,
        username=device.username,
        password=device.password,
        backends=(profile.backend,),
        max_width_ratio=device.max_width_ratio,
        threads=profile.cores,
        board=profile.name,
        ca_cert=str(units.SECRETS_DIR / "ca.pem") if device.ca_cert is not None else "",
        tls_cert=str(units.SECRETS_DIR / "device.pem") if device.tls_cert is not None else "",
        tls_key=str(units.SECRETS_DIR / "device.key") if device.tls_key is not None else "",
        mqtt="5" if device.ca_cert is not None else "3.1.1",
        task_signing_public_key=device.task_signing_public_key,
        result_key=device.result_key,
    )


@dataclass(frozen=True)
class BundleOptions:
    """How to build a bundle, beyond which board and device it is for.

    Attributes:
        sources: extra wheel sources (e.g. the PyTorch CPU index for aarch64).
        include_backend: False builds a core-only bundle (`--no-backend`): small, for tests.
        python_version: overrides the profile's Python (e.g. a user-installed 3.11).
        board_python: the interpreter install.sh uses on the board unless PYTHON is set.
        project_dir: msfusion's source tree (None: the one this module runs from).
        shard_dir: a data shard folder to ship with the bundle.
    """

    sources: WheelSources = WheelSources()
    include_backend: bool = True
    python_version: str | None = None
    board_python: str = "python3"
    project_dir: Path | None = None
    shard_dir: Path | None = None


def build_bundle(
    profile: BoardProfile,
    device: DeviceSettings,
    out_dir: Path,
    options: BundleOptions = BundleOptions(),
    progress: ProgressCallback | None = None,
) -> BundleManifest:
    """Build the install bundle for one device of a board profile.

    Args:
        profile: the board's profile.
        device: the device's id, run, broker and credentials.
        out_dir: the bundle folder to create (must not exist, or be empty).
        options: wheel sources, backend or not, Python override, shard.
        progress: hears of each step (msfusion/progress.py): msfusion's wheel, the pure-Python
            wheels, the download, the wheelhouse check, the bundle's files.

    Returns:
        The manifest (also written to out_dir/manifest.json).

    Raises:
        ConfigError: an invalid device setting or Python version.
        BundleError: a download or build failed, or a wheel does not fit the board
            (the folder is removed again).
    """
    if options.python_version is not None:
        profile = replace(profile, python_version=options.python_version)  # validates the version
    config = device_config(profile, device)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BundleError(f"{out_dir} exists and is not empty")
    project_dir = options.project_dir or _source_tree()
    try:
        manifest = _build(profile, device, config, out_dir, options, project_dir, progress)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-built bundle to flash by mistake
        raise
    log.info("bundle for %s (%s) in %s: %d wheels", device.device_id, profile.name, out_dir, len(manifest.wheels))
    return manifest


def _build(
    profile: BoardProfile,
    device: DeviceSettings,
    config: DeviceConfig,
    out_dir: Path,
    options: BundleOptions,
    project_dir: Path,
    progress: ProgressCallback | None = None,
) -> BundleManifest:
    wheelhouse = out_dir / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    out_dir.chmod(0o700)

    # 1. The wheels: msfusion's own, pure-Python sdists, then the closure for the board.
    requirement = fill_wheelhouse(profile, wheelhouse, options, project_dir, progress)

    # 2. The config, the units and the install script.
    with step(progress, "write device.toml, the units and install.sh"):
        _write(out_dir / CONFIG, to_toml(config), 0o600)
        _write(out_dir / units.DEVICE_UNIT, units.device_unit(profile.memory_max_bytes, profile.cores), 0o644)
        _write(out_dir / units.FIRSTBOOT_UNIT, units.firstboot_unit(), 0o644)
        script = units.install_script(
            requirement,
            profile.python_minor,
            options.board_python,
            PurePosixPath(device.data_dir),
            PurePosixPath(device.state_dir),
        )
        _write(out_dir / INSTALL_SCRIPT, script, 0o755)
    if device.secrets():
        with step(progress, "copy the device's TLS files"):
            (out_dir / SECRETS).mkdir(mode=0o700)
            for name, source in device.secrets().items():
                try:
                    _write_bytes(out_dir / SECRETS / name, source.read_bytes(), 0o600)
                except OSError as exc:
                    raise ConfigError(f"cannot read {source}: {exc}") from exc
    if options.shard_dir is not None:
        with step(progress, f"copy the shard {options.shard_dir}"):
            shutil.copytree(options.shard_dir, out_dir / "shard")

    manifest = BundleManifest(
        format_version=MANIFEST_FORMAT,
        profile=profile.name,
        arch=profile.arch,
        python_version=profile.python_version,
        platform_tags=profile.platform_tags,
        backend=profile.backend,
        backend_included=options.include_backend,
        device_id=device.device_id,
        requirement=requirement,
        memory_budget_bytes=config.memory_budget_bytes,
        memory_max_bytes=profile.memory_max_bytes,
        wheels=list_wheels(wheelhouse),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _write(out_dir / MANIFEST, manifest.to_json(), 0o644)
    return manifest


def fill_wheelhouse(
    profile: BoardProfile,
    wheelhouse: Path,
    options: BundleOptions,
    project_dir: Path,
    progress: ProgressCallback | None = None,
) -> str:
    """Put every wheel the board's install needs into `wheelhouse`, and check them: a bundle's first step.

    msfusion's own wheel (built from `project_dir`), the backend's pure-Python
    sdists built as wheels, then the whole closure for the board's platform and
    Python (`download_wheels`; a wheel already in `wheelhouse` is not fetched again).

    Returns:
        The requirement install.sh installs from it, "msfusion[executorch]==0.1.0".

    Raises:
        BundleError: a build or download failed, or a wheel does not fit the board.
    """
    with step(progress, "build the msfusion wheel"):
        own = build_project_wheel(project_dir, wheelhouse)
    version = parse_wheel_filename(own.name).version
    extra = f"[{profile.backend}]" if options.include_backend else ""
    if options.include_backend:
        with step(progress, f"build the pure-Python wheels of {profile.backend}"):
            build_pure_wheels(PURE_SDISTS[profile.backend], wheelhouse, options.sources)
    requirements = [f"msfusion{extra} @ {own.resolve().as_uri()}", "pip"]  # pip: install.sh upgrades the board's first
    with step(progress, f"download the wheels for {profile.name} (Python {profile.python_version})"):
        download_wheels(requirements, profile, profile.python_version, wheelhouse, options.sources)
    with step(progress, "check the wheelhouse"):
        problems = check_wheelhouse(wheelhouse, profile.python_version, profile.platform_tags)
    if problems:
        raise BundleError(f"wheels that will not install on {profile.name}:\n" + "\n".join(problems))
    return f"msfusion{extra}=={version}"


def install_bundle(bundle_dir: Path, rootfs: Path) -> BundleManifest:
    """Install a bundle into a mounted root filesystem (an SD card's rootfs partition).

    Copies the bundle to /opt/msfusion/bundle, writes /etc/msfusion/device.toml
    (0600), places both units in /etc/systemd/system and enables them with the
    symlinks `systemctl enable` would make. The venv is built at the first boot
    by msfusion-firstboot.service, since only the board can run its Python.

    Raises:
        BundleError: not a bundle.
        ConfigError: `rootfs` is not a root filesystem, or is for another architecture.
    """
    manifest = read_manifest(bundle_dir)
    if not (rootfs / "etc").is_dir():
        raise ConfigError(f"{rootfs} does not look like a root filesystem (no etc/); is it the boot partition?")
    found = rootfs_arch(rootfs)
    if found is not None and found != manifest.arch:
        raise ConfigError(f"{rootfs} is an {found} system, the bundle is for {manifest.arch} ({manifest.profile})")

    target = _inside(rootfs, units.BUNDLE_ON_BOARD)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle_dir, target)
    target.chmod(0o700)
    config = _inside(rootfs, units.CONFIG_PATH)
    config.parent.mkdir(parents=True, exist_ok=True)
    _write(config, (bundle_dir / CONFIG).read_text(encoding="utf-8"), 0o600)
    unit_dir, wants = _inside(rootfs, units.UNIT_DIR), _inside(rootfs, units.WANTS_DIR)
    wants.mkdir(parents=True, exist_ok=True)
    for unit in (units.FIRSTBOOT_UNIT, units.DEVICE_UNIT):
        _write(unit_dir / unit, (bundle_dir / unit).read_text(encoding="utf-8"), 0o644)
        link = wants / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(units.UNIT_DIR / unit)  # absolute as the board sees it, like systemctl's
    log.info("installed bundle for %s into %s", manifest.device_id, rootfs)
    return manifest


def rootfs_arch(rootfs: Path) -> str | None:
    """The architecture of a root filesystem's /usr/bin/python3 (or /bin/sh), None if unknown."""
    for candidate in ("usr/bin/python3", "bin/sh", "usr/bin/sh"):
        path = rootfs / candidate
        for _ in range(8):  # resolve links inside the rootfs, not on this machine
            if not path.is_symlink():
                break
            link = Path(os.readlink(path))
            path = rootfs / link.relative_to("/") if link.is_absolute() else path.parent / link
        try:
            with open(path, "rb") as f:
                header = f.read(20)
        except OSError:
            continue
        if header[:4] == b"\x7fELF" and len(header) == 20:
            machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
            return _ELF_MACHINE.get(machine, "unknown")
    return None


@dataclass(frozen=True)
class SshTarget:
    """A running board reachable over SSH."""

    host: str
    user: str = "root"
    port: int = 22
    identity_file: Path | None = None
    remote_dir: str = "/var/tmp/msfusion-bundle"


def ssh_commands(bundle_dir: Path, target: SshTarget) -> list[list[str]]:
    """The commands `install_over_ssh` runs, in order (argv lists; no local shell).

    1. remove a stale copy on the board; 2. scp the bundle (modes kept: device.toml
    stays 0600); 3. run install.sh as root (sudo unless the user is root, with a
    terminal so sudo can ask for a password), then delete the copy.
    """
    options = ["-p", str(target.port)] + (["-i", str(target.identity_file)] if target.identity_file else [])
    scp_options = ["-P", str(target.port)] + (["-i", str(target.identity_file)] if target.identity_file else [])
    login = f"{target.user}@{target.host}"
    remote = shlex.quote(target.remote_dir)
    sudo = "" if target.user == "root" else "sudo "
    return [
        ["ssh", *options, login, f"rm -rf {remote}"],
        ["scp", "-r", "-p", *scp_options, str(bundle_dir), f"{login}:{target.remote_dir}"],
        ["ssh", "-t", *options, login, f"{sudo}sh {remote}/{INSTALL_SCRIPT} && rm -rf {remote}"],
    ]


def install_over_ssh(
    bundle_dir: Path,
    host: str,
    user: str = "root",
    *,
    port: int = 22,
    identity_file: Path | None = None,
    run: Callable[[Sequence[str]], int] | None = None,
) -> None:
    """Copy a bundle to a running board and install it there.

    Args:
        bundle_dir: the bundle.
        host: the board's address.
        user: the SSH user (root, or a user allowed to sudo).
        port: the SSH port.
        identity_file: an SSH private key.
        run: runs one command and returns its exit code (default: subprocess).

    Raises:
        BundleError: not a bundle, or a command failed (which one is named).
    """
    read_manifest(bundle_dir)
    run = run or (lambda argv: subprocess.run(list(argv)).returncode)
    for argv in ssh_commands(bundle_dir, SshTarget(host, user, port, identity_file)):
        code = run(argv)
        if code != 0:
            raise BundleError(f"`{shlex.join(argv)}` failed with exit code {code}")


def _inside(rootfs: Path, path: PurePosixPath) -> Path:
    return rootfs / path.relative_to("/")


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _write(path: Path, text: str, mode: int) -> None:
    """Write `text` with `mode` from the start (no moment with wider permissions)."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(mode)  # the umask may have narrowed it


def _source_tree() -> Path:
    """msfusion's source tree, for an editable install (the tests' and developers' case)."""
    import msfusion

    root = Path(msfusion.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"no source tree next to {root}; pass project_dir")
    return root
