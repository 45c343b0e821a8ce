"""A wheelhouse for another machine: pip downloads for a board's platform and Python, and checks.

`pip download --platform ... --python-version ...` picks wheels by the target's
tags, but it evaluates environment markers (``platform_machine == "x86_64"``,
``python_version < "3.11"``) against the machine it runs on. ExecuTorch 1.5.1
depends on ``coremltools; platform_machine == "x86_64"``, which has no aarch64
wheel, and packages for Python 3.10 need ``exceptiongroup; python_version <
"3.11"``, so a plain cross-download from an x86_64 / Python 3.11 host fails or
leaves out a dependency. `download_wheels` therefore runs pip with its marker
environment replaced by the board's (`marker_environment`), checked at start-up
so a pip that stops honouring the patch fails loudly instead of silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import tomllib

from msfusion.devices.profiles import BoardProfile
from msfusion.errors import (
    BundleError as BundleError,  # re-exported: it was defined here first
)

log = logging.getLogger(__name__)

# Dependencies that PyPI serves as source only, though pure Python: built here as
# py3-none-any wheels so that `--only-binary=:all:` can resolve the rest.
PURE_SDISTS = {
    "ort": (),
    "executorch": ("antlr4-python3-runtime==4.9.3",),  # hydra-core 1.3 pins antlr4 4.9.*
    "torch": (),
}

_PIP_FOR_TARGET = """
import json, runpy, sys
from pip._vendor.packaging import markers
environment = json.loads(sys.argv[1])
markers.default_environment = lambda: dict(environment)
probe = markers.Marker('platform_machine == "%s"' % environment["platform_machine"])
if not probe.evaluate():
    sys.exit("msfusion: this pip ignores the target marker environment; cannot cross-download")
sys.argv = ["pip", *sys.argv[2:]]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class WheelSources:
    """Where pip looks for wheels, beyond (or instead of) its own configuration.

    Example: aarch64 boards get a CPU-only torch (PyPI's aarch64 torch 2.13.0
    pulls 2.3 GiB of CUDA 13 wheels) from
    ``WheelSources(extra_index_urls=("https://download.pytorch.org/whl/cpu",))``.

    Attributes:
        index_url: replaces pip's index (None: pip's configuration).
        extra_index_urls: further indexes.
        find_links: local folders or pages of wheels.
        no_index: no index at all: `find_links` only (offline).
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False

    def pip_args(self) -> list[str]:
        """These sources as pip options."""
        args = ["--no-index"] if self.no_index else (["--index-url", self.index_url] if self.index_url else [])
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        return args


@dataclass(frozen=True)
class WheelTags:
    """The parts of a wheel's file name (PEP 427)."""

    name: str
    version: str
    pythons: tuple[str, ...]
    abis: tuple[str, ...]
    platforms: tuple[str, ...]


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a wheelhouse, as the bundle manifest lists it."""

    filename: str
    sha256: str
    size_bytes: int


def marker_environment(profile: BoardProfile, python_version: str) -> dict[str, str]:
    """The PEP 508 marker environment of a board running CPython `python_version` on Linux."""
    minor = ".".join(python_version.split(".")[:2])
    full = python_version if python_version.count(".") == 2 else f"{python_version}.0"
    return {
        "implementation_name": "cpython",
        "implementation_version": full,
        "os_name": "posix",
        "platform_machine": profile.arch,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": full,
        "python_version": minor,
        "sys_platform": "linux",
    }


def _pip_for_target(profile: BoardProfile, python_version: str, pip_args: Sequence[str]) -> list[str]:
    """Run pip with the board's tags and markers: `pip_args` start with the subcommand."""
    minor = ".".join(python_version.split(".")[:2])
    target = [
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python_version,
        "--abi",
        "cp" + minor.replace(".", ""),
    ]
    for tag in profile.platform_tags:
        target += ["--platform", tag]
    env = json.dumps(marker_environment(profile, python_version))
    return [sys.executable, "-c", _PIP_FOR_TARGET, env, pip_args[0], *target, *pip_args[1:]]


def download_command(
    requirements: Sequence[str], profile: BoardProfile, python_version: str, dest: Path, sources: WheelSources
) -> list[str]:
    """The command that downloads `requirements` and their dependencies as the board's wheels."""
    args = ["download", "--dest", str(dest), "--find-links", str(dest), "--progress-bar", "off"]
    return _pip_for_target(profile, python_version, [*args, *sources.pip_args(), *requirements])


def download_wheels(
    requirements: Sequence[str], profile: BoardProfile, python_version: str, dest: Path, sources: WheelSources
) -> None:
    """Download the board's wheels for `requirements` (and every dependency) into `dest`.

    Raises:
        BundleError: pip failed (its output's tail and the profile's notes are in the message).
    """
    _run(download_command(requirements, profile, python_version, dest, sources), "pip download", profile.notes)


def resolve_wheels(
    requirements: Sequence[str],
    profile: BoardProfile,
    python_version: str,
    sources: WheelSources,
    find_links: Sequence[Path] = (),
) -> list[str]:
    """The wheel file names `download_wheels` would fetch, resolved from metadata only.

    Cheap (PyPI serves each wheel's metadata on its own): for showing what a
    bundle will hold, and its size, before downloading gigabytes.

    Raises:
        BundleError: pip could not resolve the requirements for the board.
    """
    with tempfile.TemporaryDirectory(prefix="msfusion-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        args = [
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--target",
            str(Path(tmp) / "target"),
            "--report",
            str(report),
            *[f"--find-links={p}" for p in find_links],
            *sources.pip_args(),
            *requirements,
        ]
        command = _pip_for_target(profile, python_version, args)
        _run(command, "pip resolve", profile.notes)
        installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return [item["download_info"]["url"].rsplit("/", 1)[-1] for item in installs]


def install_command(wheels: Sequence[Path], profile: BoardProfile, python_version: str, target: Path) -> list[str]:
    """The command that unpacks exactly `wheels` into `target` (`pip install --target`) as the board's pip would.

    No index and no dependency resolution: `wheels` is the closure already
    (`resolve_wheels`). For a board emulated on this machine (`devices/emulation.py`).
    """
    args = ["install", "--no-deps", "--no-index", "--quiet", "--progress-bar", "off", "--target", str(target)]
    return _pip_for_target(profile, python_version, [*args, *map(str, wheels)])


def build_project_wheel(project_dir: Path, dest: Path) -> Path:
    """Build msfusion's own (pure Python) wheel from a source tree.

    The tree is copied first, so the build writes no build/ or egg-info into
    the working tree and two builds never share a folder.

    Raises:
        BundleError: not a source tree, or the build failed.
    """
    pyproject = project_dir / "pyproject.toml"
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BundleError(f"{project_dir} is not msfusion's source tree: {exc}") from exc
    try:
        package_dirs = {d.split("/")[0] for d in config["tool"]["setuptools"]["package-dir"].values()}
    except (KeyError, AttributeError) as exc:
        raise BundleError(f"{pyproject} has no [tool.setuptools] package-dir") from exc
    with tempfile.TemporaryDirectory(prefix="msfusion-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (project_dir / name).exists():
                shutil.copy2(project_dir / name, src / name)
        for name in sorted(package_dirs):
            shutil.copytree(project_dir / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
        if importlib.util.find_spec("setuptools") is not None:
            command.insert(4, "--no-build-isolation")  # no download of the build backend
        _run(command, "building the msfusion wheel")
        built = sorted(out.glob("msfusion-*.whl"))
        if len(built) != 1 or not built[0].name.endswith("-py3-none-any.whl"):
            raise BundleError(f"expected one pure-Python msfusion wheel, got {[p.name for p in built]}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built[0], dest / built[0].name))


def build_pure_wheels(requirements: Sequence[str], dest: Path, sources: WheelSources) -> list[Path]:
    """Build py3-none-any wheels for source-only, pure-Python requirements.

    Raises:
        BundleError: a build failed, or a package built a platform-specific wheel.
    """
    built: list[Path] = []
    for requirement in requirements:
        with tempfile.TemporaryDirectory(prefix="msfusion-sdist-") as tmp:
            command = [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "-q",
                "-w",
                tmp,
                *sources.pip_args(),
                requirement,
            ]
            _run(command, f"building a wheel for {requirement}")
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1 or parse_wheel_filename(wheels[0].name).platforms != ("any",):
                raise BundleError(f"{requirement} did not build one pure-Python wheel: {[w.name for w in wheels]}")
            built.append(Path(shutil.copy2(wheels[0], dest / wheels[0].name)))
    return built


def parse_wheel_filename(filename: str) -> WheelTags:
    """Split `name-version[-build]-python-abi-platform.whl` into its tags.

    Raises:
        BundleError: not a wheel file name.
    """
    parts = filename[:-4].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise BundleError(f"not a wheel file name: {filename!r}")
    python, abi, platform = parts[-3:]
    return WheelTags(parts[0], parts[1], tuple(python.split(".")), tuple(abi.split(".")), tuple(platform.split(".")))


def _python_fits(python: str, abi: str, minor: int) -> bool:
    """Whether a (python, abi) tag pair installs on CPython 3.`minor` (as packaging.tags ranks them)."""
    impl, digits = python[:2], python[2:]
    if impl not in ("cp", "py") or not digits.isdigit() or digits[0] != "3":
        return False
    tag_minor = int(digits[1:]) if len(digits) > 1 else None
    if abi == f"cp3{minor}":
        return impl == "cp" and tag_minor == minor
    if abi == "abi3":
        return impl == "cp" and tag_minor is not None and tag_minor <= minor
    if abi != "none":
        return False
    if impl == "py":  # py3, py311, py37: any CPython 3 at least that new
        return tag_minor is None or tag_minor <= minor
    return tag_minor == minor


def wheel_mismatch(filename: str, python_version: str, platform_tags: Sequence[str]) -> str | None:
    """Why a wheel will not install on the board, or None when it will.

    Args:
        filename: the wheel's file name.
        python_version: the board's CPython, "3.11" or "3.11.2".
        platform_tags: the board's platform tags (`BoardProfile.platform_tags`).
    """
    tags = parse_wheel_filename(filename)
    minor = int(python_version.split(".")[1])
    if not any(p == "any" or p in platform_tags for p in tags.platforms):
        return f"{filename}: platform {'.'.join(tags.platforms)} is not one of the board's"
    if not any(_python_fits(py, abi, minor) for py in tags.pythons for abi in tags.abis):
        return f"{filename}: {'.'.join(tags.pythons)}-{'.'.join(tags.abis)} does not run on CPython 3.{minor}"
    return None


def check_wheelhouse(wheelhouse: Path, python_version: str, platform_tags: Sequence[str]) -> list[str]:
    """Every reason a file of the wheelhouse will not install on the board (empty: all fit)."""
    problems = []
    for path in sorted(wheelhouse.iterdir()):
        if path.suffix != ".whl":
            problems.append(f"{path.name}: not a wheel (a source distribution would need a compiler on the board)")
            continue
        reason = wheel_mismatch(path.name, python_version, platform_tags)
        if reason is not None:
            problems.append(reason)
    return problems


def list_wheels(wheelhouse: Path) -> tuple[WheelFile, ...]:
    """The wheelhouse's files with their sha256 and size, sorted by name."""
    out = []
    for path in sorted(wheelhouse.glob("*.whl")):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out.append(WheelFile(path.name, digest.hexdigest(), path.stat().st_size))
    return tuple(out)


def _run(command: list[str], what: str, hint: str = "") -> None:
    log.info("%s", what)
    log.debug("running %s", command)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BundleError(f"{what} failed (exit {proc.returncode}):\n{tail}" + (f"\nNote: {hint}" if hint else ""))
