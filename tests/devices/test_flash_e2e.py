"""Flash a root filesystem, boot the daemon from what was installed there, and train one round with it.

The root filesystem is a folder standing in for a board's SD card (same
architecture, x86_64). The bundle is a real one, with the ONNX Runtime
backend (onnxruntime-training from PyPI). install.sh builds the venv as the
first boot would, then the daemon starts the way msfusion-device.service
starts it (its ExecStart, verbatim) inside the root filesystem: a chroot in a
private mount namespace that lends it this machine's /usr and Python (a board
has its own), /proc, /dev and /sys, and nothing else. It registers with a
real coordinator over Mosquitto and trains a round.

Needs root (chroot, mounts) and network access to PyPI: about 2 minutes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
from msfusion.coordinator.fleet.config import (
    CoordinatorConfig,
    FleetConfig,
    RoundConfig,
)
from msfusion.coordinator.fleet.local_fleet import (
    PartitionConfig,
    partition_data,
    stop_processes,
)
from msfusion.devices import units
from msfusion.devices.flash import (
    BundleOptions,
    DeviceSettings,
    build_bundle,
    install_bundle,
)
from msfusion.devices.profiles import BUILTIN_PROFILES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coordinator" / "fleet"))
from fleet_harness import ENGINE, CoordinatorThread, merged_rounds, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PC = BUILTIN_PROFILES["x86_64-generic"]
HOST_DIRS = ("usr", "bin", "lib", "lib64", "sbin")


def chroot_command(rootfs: Path, argv: list[str]) -> list[str]:
    """Run `argv` (paths as the board sees them) inside `rootfs`, with this machine's OS and Python lent read-only.

    A private mount namespace: every mount vanishes with the process.
    """
    q = shlex.quote

    def bind(host: Path) -> list[str]:
        target = q(str(rootfs / host.relative_to("/")))
        return [f"mkdir -p {target}", f"mount --bind {q(str(host))} {target}", f"mount -o remount,bind,ro {target}"]

    script = []
    for name in HOST_DIRS:
        host = Path("/") / name
        if host.is_symlink():  # usr-merged: bin -> usr/bin
            script.append(f"[ -e {q(str(rootfs / name))} ] || ln -s {q(os.readlink(host))} {q(str(rootfs / name))}")
        elif host.is_dir():
            script += bind(host)
    script += bind(Path(sys.base_prefix))  # the board's own Python, here this machine's
    for name in ("proc", "dev", "sys", "tmp"):
        script.append(f"mkdir -p {q(str(rootfs / name))}")
    script += [
        f"mount -t proc proc {q(str(rootfs / 'proc'))}",
        f"mount --rbind /dev {q(str(rootfs / 'dev'))}",
        f"mount --rbind /sys {q(str(rootfs / 'sys'))}",
        f"exec chroot {q(str(rootfs))} {shlex.join(argv)}",
    ]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "\n".join(script)]


def exec_start(unit_text: str) -> list[str]:
    """The ExecStart command of a systemd unit."""
    line = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.split("=", 1)[1])


@pytest.fixture(scope="module")
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test chroots into the flashed root filesystem")


def test_a_flashed_root_filesystem_boots_the_daemon_which_trains_a_round(
    root_only: None, mosquitto: Any, tmp_path: Path
) -> None:
    # Prepare: one device's shard, a bundle with the ORT backend, an empty root filesystem
    shards = partition_data(
        PartitionConfig(devices=1, scheme="iid", seed=3, samples_per_device=256, test_samples=300), tmp_path / "shards"
    )
    run_id = "flashed"
    device = DeviceSettings("dev000", run_id, mosquitto.url, memory_budget_bytes=2 << 30)
    bundle = tmp_path / "bundle"
    manifest = build_bundle(PC, device, bundle, BundleOptions(shard_dir=shards.devices[0]))
    assert manifest.backend_included and any(w.filename.startswith("onnxruntime_training-") for w in manifest.wheels)
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)

    # Execute: flash it, run the first boot's install, start the unit's command inside it
    install_bundle(bundle, rootfs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(MSFUSION_ROOT=str(rootfs), PYTHON=sys.executable)
    installed = rootfs / "opt/msfusion/bundle/install.sh"
    proc = subprocess.run(["sh", str(installed), "--firstboot"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    argv = exec_start((rootfs / "etc/systemd/system" / units.DEVICE_UNIT).read_text())
    assert argv[0] == "/opt/msfusion/venv/bin/python"
    log_path = tmp_path / "dev000.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            chroot_command(rootfs, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONUNBUFFERED": "1",
                "MALLOC_ARENA_MAX": "2",
                "OMP_NUM_THREADS": "1",
            },
        )
    out = tmp_path / "run"
    config = CoordinatorConfig(
        engine=replace(ENGINE, rounds=1),
        run_id=run_id,
        broker=mosquitto.url,
        out=out,
        eval_shard=shards.test,
        backend="ort",
        artifact_cache=tmp_path / "artifacts",
        round=RoundConfig(deadline_s=120.0, quorum=1.0),
        fleet=FleetConfig(min_devices=1, wait_s=120.0, heartbeat_timeout_s=30.0),
    )
    coordinator = CoordinatorThread(config, ExportedArtifacts(config.engine, "ort", cache_dir=tmp_path / "artifacts"))
    coordinator.start()
    try:
        wait_for(
            lambda: "connected to" in log_path.read_text(errors="replace") or daemon.poll() is not None,
            120,
            "the flashed daemon to connect",
        )
        root_seen = os.readlink(f"/proc/{daemon.pid}/root")
        summary = coordinator.result(timeout_s=300)
    finally:
        [code] = stop_processes([daemon], timeout_s=15)
    log = log_path.read_text(errors="replace")

    # Assert: the daemon that trained ran inside the flashed root filesystem, from its venv, on its shard
    assert summary.ok, (summary.reason, log[-3000:])
    [line] = merged_rounds(out)
    assert line["replies"] == {"dev000": "merged"}, log[-3000:]
    assert root_seen == str(rootfs)
    assert code == 0, log[-3000:]
    assert "connected to" in log and "round 0: task" in log
    assert (rootfs / "var/lib/msfusion/state").is_dir() and any((rootfs / "var/lib/msfusion/state").iterdir())
    assert not (rootfs / "opt/msfusion/venv/lib/python3.11/site-packages/torch").exists()
