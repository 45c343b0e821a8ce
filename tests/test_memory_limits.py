"""The test suite's memory caps are real: past the limit a process is OOM-killed (cgroup v1) or its allocation fails (RLIMIT_AS)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from memory_limits import ADDRESS_SPACE_SLACK, AddressSpaceCap, CgroupCap, own_cgroup_v1

MIB = 1 << 20
ALLOCATE = "import sys; block = bytearray(int(sys.argv[1])); print('allocated', len(block))"


def test_a_cgroup_cap_oom_kills_a_process_past_its_limit_and_is_removed_after() -> None:
    parent = own_cgroup_v1()
    if parent is None:
        pytest.skip("no writable cgroup v1 memory controller here (the fleet tests use RLIMIT_AS instead)")
    cap = CgroupCap(parent, "probe", 128 * MIB)
    try:
        under = subprocess.run(
            cap.command([sys.executable, "-c", ALLOCATE, str(32 * MIB)]), capture_output=True, text=True
        )
        over = subprocess.run(
            cap.command([sys.executable, "-c", ALLOCATE, str(256 * MIB)]), capture_output=True, text=True
        )
        kills = cap.oom_kills()
    finally:
        cap.close()
    assert under.returncode == 0 and "allocated" in under.stdout
    assert over.returncode == -9 and kills == 1
    assert not cap.path.exists()


def test_an_address_space_cap_fails_an_allocation_past_its_limit() -> None:
    cap = AddressSpaceCap("probe", 128 * MIB)
    env = {"MALLOC_ARENA_MAX": "2"}
    under = subprocess.run(
        cap.command([sys.executable, "-c", ALLOCATE, str(32 * MIB)]), capture_output=True, text=True, env=env
    )
    too_much = str(128 * MIB + ADDRESS_SPACE_SLACK)
    over = subprocess.run(
        cap.command([sys.executable, "-c", ALLOCATE, too_much]), capture_output=True, text=True, env=env
    )
    assert under.returncode == 0 and "allocated" in under.stdout
    assert over.returncode == 1 and "MemoryError" in over.stderr
    assert cap.oom_kills() == 0
