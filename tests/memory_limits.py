"""Real memory limits for device processes in tests: a cgroup v1 memory controller, else RLIMIT_AS.

`memory_cap(name, limit_bytes)` returns a cap whose `command(argv)` starts a
process inside it:

- `CgroupCap` (preferred; this machine kind and CI run as root with a
  writable v1 memory controller): a child cgroup of this process's own memory
  cgroup with `memory.limit_in_bytes` set; the kernel's OOM killer acts at the
  limit, and `memory.oom_control` counts its kills (`oom_kills()`).
- `AddressSpaceCap` (fallback where cgroup v1 is not writable): RLIMIT_AS,
  with MALLOC_ARENA_MAX=2 (without it glibc's per-thread arenas exhaust the
  address space and thread creation fails). RLIMIT_AS bounds virtual memory,
  not resident memory, so the limit is the resident limit plus
  `ADDRESS_SPACE_SLACK`, what a training runtime maps without touching
  (thread stacks, arenas, library reservations; measured with ONNX Runtime:
  VmPeak - VmHWM is 0.45-0.55 GiB). An allocation past it fails instead of
  being killed, so `oom_kills()` is always 0 there.

`close()` removes the cgroup once its processes have exited;
`remove_stale_cgroups()` clears what an interrupted session left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Protocol, Sequence

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
PREFIX = "msfusion-test-"
ADDRESS_SPACE_SLACK = 768 << 20


class MemoryCap(Protocol):
    name: str
    limit_bytes: int
    kind: str

    def command(self, argv: Sequence[str]) -> list[str]: ...

    def env(self) -> dict[str, str]: ...

    def oom_kills(self) -> int: ...

    def close(self) -> None: ...


def own_cgroup_v1() -> Path | None:
    """This process's memory cgroup folder, when cgroup v1's memory controller is mounted and writable."""
    if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = CGROUP_V1_MEMORY / path.lstrip("/")
            return folder if os.access(folder, os.W_OK) else None
    return None


class CgroupCap:
    """A child cgroup (v1) with a memory limit."""

    kind = "cgroup-v1"

    def __init__(self, parent: Path, name: str, limit_bytes: int) -> None:
        self.name = name
        self.limit_bytes = limit_bytes
        self.path = parent / f"{PREFIX}{os.getpid()}-{name}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap_limit = self.path / "memory.memsw.limit_in_bytes"
        if swap_limit.exists():  # no swapping out of trouble where the host has swap
            try:
                swap_limit.write_text(str(limit_bytes))
            except OSError:
                pass

    def command(self, argv: Sequence[str]) -> list[str]:
        # The shell joins the cgroup, then becomes the process: everything it allocates is charged there.
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *argv]

    def env(self) -> dict[str, str]:
        return {}

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def max_usage_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def close(self) -> None:
        _remove_cgroup(self.path)


class AddressSpaceCap:
    """RLIMIT_AS on the process (and its children), with MALLOC_ARENA_MAX=2."""

    kind = "rlimit-as"

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.name = name
        self.limit_bytes = limit_bytes

    def command(self, argv: Sequence[str]) -> list[str]:
        limit = self.limit_bytes + ADDRESS_SPACE_SLACK
        setter = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "os.execvp(sys.argv[1], sys.argv[1:])"
        )
        return [sys.executable, "-c", setter, *argv]

    def env(self) -> dict[str, str]:
        return {"MALLOC_ARENA_MAX": "2"}

    def oom_kills(self) -> int:
        return 0

    def close(self) -> None:
        pass


def memory_cap(name: str, limit_bytes: int) -> MemoryCap:
    """A cgroup v1 cap where this machine allows one, else an RLIMIT_AS cap.

    MSFUSION_TEST_MEMORY_CAP=rlimit forces the fallback (to test it where cgroups work).
    """
    parent = own_cgroup_v1() if os.environ.get("MSFUSION_TEST_MEMORY_CAP") != "rlimit" else None
    if parent is not None:
        try:
            return CgroupCap(parent, name, limit_bytes)
        except OSError:
            pass
    return AddressSpaceCap(name, limit_bytes)


def start_capped(
    cap: MemoryCap, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` inside `cap`, logging to `log_path`."""
    full_env = {**os.environ, **(env or {}), **cap.env()}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as handle:
        return subprocess.Popen(cap.command(argv), stdout=handle, stderr=subprocess.STDOUT, env=full_env)


def _remove_cgroup(path: Path, timeout_s: float = 10.0) -> None:
    """rmdir a cgroup once its processes are gone (the kernel refuses while any remain)."""
    deadline = time.monotonic() + timeout_s
    while path.exists():
        try:
            path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def remove_stale_cgroups() -> list[Path]:
    """Remove this suite's cgroups that an interrupted session left, when no process is left in them."""
    parent = own_cgroup_v1()
    removed: list[Path] = []
    if parent is None:
        return removed
    for path in parent.glob(PREFIX + "*"):
        try:
            if not (path / "cgroup.procs").read_text().strip():
                path.rmdir()
                removed.append(path)
        except OSError:
            continue
    return removed
