"""An aarch64 board's Python on this x86_64 machine: one qemu-user process, without binfmt_misc or a disk image.

`prepare_board` lays out, under one cache folder (reused by later calls)::

    debs/        Debian bookworm's arm64 CPython 3.11 and the libraries it loads (`apt-get download`)
    root/        those packages unpacked (`dpkg -x`), with a Raspberry Pi 4's CPU files (`write_cpu_identity`)
    wheelhouse/  the board bundle's wheels: `flash.fill_wheelhouse`, what `msfusion devices flash` fetches
    site/        the wheelhouse's closure but msfusion, installed with the board's tags (`pip install --target`)

and installs msfusion's own wheel, built from the source tree as a bundle
builds it, into a folder of the caller's (it changes with every edit). Then
`EmulatedBoard.command(args)` is::

    qemu-aarch64-static -cpu cortex-a72 -L ROOT ROOT/usr/bin/python3.11 ARGS

qemu-user translates one aarch64 Linux process on this machine's kernel.
`-L ROOT` sends the guest's dynamic loader, and every absolute path that exists
under ROOT, to ROOT; other paths (the caller's files) are this machine's. The
process must not exec another program: without binfmt_misc this kernel cannot
run an aarch64 binary, so `subprocess` inside the guest fails.

The CPU files: qemu-user 7.2 passes this machine's /proc/cpuinfo and
/sys/devices/system/cpu through, x86 text that PyTorch's cpuinfo library
cannot parse (it crashes importing torch). ROOT gets what a Raspberry Pi 4
shows instead (four Cortex-A72 cores), and qemu emulates that CPU, so the
instructions and the feature bits agree: a wheel built for a newer Arm core
would fail here with SIGILL as on the board.

What it proves: the bundle's aarch64 wheels install, load and run on an
aarch64 CPython 3.11.2 / glibc 2.36 (Raspberry Pi OS bookworm's). Not: the
board's kernel, memory or speed (a step takes about 30x longer than on the
board), systemd, or the board's own pip.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from msfusion.devices.flash import BundleOptions, fill_wheelhouse
from msfusion.devices.profiles import BoardProfile
from msfusion.devices.wheelhouse import (
    WheelSources,
    build_project_wheel,
    install_command,
    parse_wheel_filename,
    resolve_wheels,
)
from msfusion.errors import BundleError
from msfusion.progress import ProgressCallback, step

log = logging.getLogger(__name__)

QEMU = "qemu-aarch64-static"  # Debian: qemu-user-static
PYTHON = "usr/bin/python3.11"  # inside ROOT
# Debian bookworm's CPython 3.11.2 (Raspberry Pi OS bookworm's) and every library its
# standard library's extension modules load; libstdc++ and libgcc for the wheels' C++.
DEBIAN_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libsqlite3-0",
    "libcrypt1",
    "libtinfo6",
    "libncursesw6",
    "libreadline8",
)
CORTEX_A72 = "0x00000000410fd083"  # MIDR_EL1 of the Raspberry Pi 4's cores (r0p3), as qemu's cortex-a72 reports it
_STAMP = ".msfusion-prepared.json"


@dataclass(frozen=True)
class EmulatedBoard:
    """One aarch64 Python under qemu-user, with the board's install on its path.

    Attributes:
        root: the board's files (`-L`): Debian's arm64 packages and the CPU files.
        paths: PYTHONPATH inside the guest, first wins (msfusion, then its closure).
        cpu: qemu's CPU model.
        env: variables the guest gets beyond `environment`'s own (HOME).
    """

    root: Path
    paths: tuple[Path, ...]
    cpu: str = "cortex-a72"
    env: Mapping[str, str] = field(default_factory=dict)

    def command(self, args: Sequence[str]) -> list[str]:
        """The command line that runs the board's python3.11 with `args`."""
        return [QEMU, "-cpu", self.cpu, "-L", str(self.root), str(self.root / PYTHON), *args]

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The guest's environment: none of this machine's, the install on PYTHONPATH."""
        return {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONNOUSERSITE": "1",
            "PYTHONPATH": os.pathsep.join(str(p) for p in self.paths),
            **self.env,
            **(extra or {}),
        }

    def run(
        self, args: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the board's python3.11 with `args` and wait (output captured as text)."""
        return subprocess.run(
            self.command(args), env=self.environment(env), capture_output=True, text=True, timeout=timeout_s
        )


def prepare_board(
    profile: BoardProfile,
    cache_dir: Path,
    board_dir: Path,
    project_dir: Path,
    sources: WheelSources = WheelSources(),
    progress: ProgressCallback | None = None,
) -> EmulatedBoard:
    """Make (or reuse) an emulated `profile` board with msfusion and its backend installed.

    Args:
        profile: an aarch64 profile on CPython 3.11 (Debian bookworm's Python).
        cache_dir: the reusable part: Debian's packages, the root, the wheelhouse, the closure.
        board_dir: where msfusion's own wheel is installed this time.
        project_dir: msfusion's source tree.
        sources: wheel sources for a missing wheel (the closure is first looked for in the cache, offline).
        progress: hears of each step.

    Raises:
        BundleError: qemu-aarch64-static is missing, the profile is not an aarch64 CPython 3.11
            board, or a download, unpack or install failed.
    """
    if shutil.which(QEMU) is None:
        raise BundleError(f"{QEMU} is not installed (Debian: apt-get install qemu-user-static; scripts/setup.sh does)")
    if profile.arch != "aarch64" or profile.python_minor != "3.11":
        raise BundleError(
            f"{profile.name}: only aarch64 boards on CPython 3.11 can be emulated (Debian bookworm's Python), "
            f"not {profile.arch} / {profile.python_version}"
        )
    with step(progress, "download Debian's arm64 Python 3.11"):
        debs = download_debs(cache_dir / "debs")
    with step(progress, "unpack the board's root"):
        root = unpack_root(debs, cache_dir / "root")
        write_cpu_identity(root, profile.cores)
    wheelhouse = cache_dir / "wheelhouse"
    with step(progress, "build the msfusion wheel"):
        own = build_project_wheel(project_dir, wheelhouse)
    closure = _closure(profile, own, wheelhouse, project_dir, sources, progress)
    with step(progress, f"install {len(closure)} wheels for {profile.name}"):
        site = install_site(profile, [wheelhouse / name for name in closure], cache_dir / "site")
    with step(progress, "install msfusion"):
        board_dir.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="msfusion-", dir=board_dir))
        _run(install_command([own], profile, profile.python_version, target), "installing msfusion for the board")
    return EmulatedBoard(root, (target, site), env={"HOME": str(board_dir)})


def download_debs(dest: Path, packages: Sequence[str] = DEBIAN_PACKAGES) -> list[Path]:
    """Debian's arm64 `packages` in `dest` (`apt-get download`; the ones already there are kept).

    Adds the arm64 architecture to dpkg and refreshes apt's lists when it lacks
    them (that needs root; fetching the packages does not).

    Raises:
        BundleError: apt could not find or fetch a package.
    """
    dest.mkdir(parents=True, exist_ok=True)
    missing = [name for name in packages if not _debs_of(dest, name)]
    if missing:
        if "arm64" not in _output(["dpkg", "--print-foreign-architectures"]).split():
            _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64 (needs root)")
            _run(["apt-get", "update", "-qq"], "apt-get update")
        command = ["apt-get", "download", "-qq", *(f"{name}:arm64" for name in missing)]
        try:
            _run(command, "apt-get download", cwd=dest)
        except BundleError:  # stale lists name versions the mirror no longer has
            _run(["apt-get", "update", "-qq"], "apt-get update")
            _run(command, "apt-get download", cwd=dest)
    return [_debs_of(dest, name)[-1] for name in packages]


def unpack_root(debs: Sequence[Path], root: Path) -> Path:
    """`dpkg -x` every package into `root`, unless it already holds exactly these.

    Unpacked into a fresh folder first and renamed into place, so a failed run leaves no half root.

    Raises:
        BundleError: dpkg failed.
    """
    stamp = sorted(deb.name for deb in debs)

    def unpack(staging: Path) -> None:
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(staging)], f"unpacking {deb.name}")
        if not (staging / PYTHON).is_file():
            raise BundleError(f"the packages hold no {PYTHON}: {stamp}")

    return _prepared(root, stamp, unpack)


def write_cpu_identity(root: Path, cores: int, midr: str = CORTEX_A72) -> None:
    """Write the /proc/cpuinfo and /sys/devices/system/cpu files of a board of `cores` Cortex-A72s into `root`.

    What a Raspberry Pi 4 shows (frequencies, caches, one cluster); `-L root` makes the guest read
    these instead of this machine's x86 ones.
    """
    cpus = f"0-{cores - 1}"
    files = {"online": cpus, "present": cpus, "possible": cpus, "offline": "", "kernel_max": str(cores - 1)}
    cpuinfo = []
    for i in range(cores):
        cpu = f"cpu{i}"
        files[f"{cpu}/regs/identification/midr_el1"] = midr
        files[f"{cpu}/regs/identification/revidr_el1"] = "0x0000000000000000"
        topology = {"physical_package_id": "0", "cluster_id": "0", "core_id": str(i)}
        topology |= {"core_cpus_list": str(i), "thread_siblings_list": str(i)}
        topology |= {"cluster_cpus_list": cpus, "core_siblings_list": cpus, "package_cpus_list": cpus}
        files |= {f"{cpu}/topology/{name}": value for name, value in topology.items()}
        files[f"{cpu}/cpufreq/cpuinfo_max_freq"] = "1500000"
        files[f"{cpu}/cpufreq/cpuinfo_min_freq"] = "600000"
        caches = [
            ("1", "Data", "32K", str(i), "2"),
            ("1", "Instruction", "48K", str(i), "3"),
            ("2", "Unified", "1024K", cpus, "16"),
        ]
        for index, (level, kind, size, shared, ways) in enumerate(caches):
            values = {"level": level, "type": kind, "size": size, "shared_cpu_list": shared}
            values |= {"coherency_line_size": "64", "ways_of_associativity": ways}
            files |= {f"{cpu}/cache/index{index}/{name}": value for name, value in values.items()}
        part, revision = int(midr, 16) >> 4 & 0xFFF, int(midr, 16) & 0xF
        cpuinfo.append(
            f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
            f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
            f"CPU part\t: {part:#05x}\nCPU revision\t: {revision}\n"
        )
    sysfs = root / "sys/devices/system/cpu"
    shutil.rmtree(sysfs, ignore_errors=True)
    for name, value in files.items():
        (sysfs / name).parent.mkdir(parents=True, exist_ok=True)
        (sysfs / name).write_text(value + "\n")
    hardware = "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text("\n".join(cpuinfo) + "\n" + hardware)


def install_site(profile: BoardProfile, wheels: Sequence[Path], site: Path) -> Path:
    """Install exactly `wheels` into `site` with the board's tags, unless it already holds exactly these.

    Raises:
        BundleError: pip failed.
    """

    def install(staging: Path) -> None:
        _run(
            install_command(wheels, profile, profile.python_version, staging),
            f"installing the wheels for {profile.name}",
        )

    return _prepared(site, sorted(wheel.name for wheel in wheels), install)


def _closure(
    profile: BoardProfile,
    own: Path,
    wheelhouse: Path,
    project_dir: Path,
    sources: WheelSources,
    progress: ProgressCallback | None,
) -> list[str]:
    """The wheel files of msfusion[backend]'s closure but msfusion's own, from the wheelhouse.

    Resolved offline first; a wheelhouse that lacks one is filled as a bundle's is, then resolved again.
    """
    requirement = [f"msfusion[{profile.backend}] @ {own.resolve().as_uri()}"]
    offline = WheelSources(find_links=(str(wheelhouse),), no_index=True)
    try:
        with step(progress, "resolve the closure from the cached wheelhouse"):
            names = resolve_wheels(requirement, profile, profile.python_version, offline)
    except BundleError as exc:
        log.info("the cached wheelhouse is incomplete (%s); filling it", str(exc).splitlines()[0])
        fill_wheelhouse(profile, wheelhouse, BundleOptions(sources=sources), project_dir, progress)
        names = resolve_wheels(requirement, profile, profile.python_version, offline)
    return sorted(name for name in names if parse_wheel_filename(name).name != "msfusion")


def _debs_of(dest: Path, package: str) -> list[Path]:
    return sorted(dest.glob(f"{package}_*_arm64.deb"))


def _prepared(folder: Path, stamp: list[str], fill: Callable[[Path], None]) -> Path:
    """`folder`, filled by `fill(staging)` unless its stamp already says `stamp`.

    Filled in a fresh sibling folder, stamped, then renamed into place: a failed `fill` leaves no half folder.
    """
    if _read_stamp(folder) == stamp:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fill(staging)
        _write_stamp(staging, stamp)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_stamp(folder: Path) -> list[str] | None:
    try:
        return list(json.loads((folder / _STAMP).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_stamp(folder: Path, stamp: list[str]) -> None:
    (folder / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BundleError(f"`{' '.join(command)}` failed: {exc}") from exc


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    log.info("%s", what)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except OSError as exc:
        raise BundleError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BundleError(f"{what} failed (exit {proc.returncode}):\n{tail}")
