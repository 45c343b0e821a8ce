"""`msfusion devices ...`: board profiles, profiling artifacts, flashing and installing the device runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.text import Text

from msfusion.coordinator.cli.common import (
    check_backend,
    cli_errors,
    console,
    parse_list,
    positive_int,
    progress_bars,
    setup_logging,
)
from msfusion.errors import ConfigError

devices_app = typer.Typer(
    no_args_is_help=True, help="Board profiles, profiling artifacts, flashing the device runtime."
)


@devices_app.command("list")
def devices_list(
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="a TOML file of your own board profiles"),
) -> None:
    """The board profiles: architecture, RAM, backend, the runtime's budget and the unit's hard cap.

    Exit codes: 0 success, 2 config (an unreadable or invalid --profiles file).
    """
    from rich.table import Table

    from msfusion.devices.profiles import load_profiles

    with cli_errors():
        known = load_profiles(profiles)
    table = Table("profile", "arch", "RAM", "cores", "OS", "Python", "backend", "budget", "MemoryMax")
    for p in sorted(known.values(), key=lambda p: p.name):
        table.add_row(
            Text(p.name),  # a user's own profiles file names these: never markup
            p.arch,
            f"{p.ram_bytes / 2**30:.0f} GiB",
            str(p.cores),
            Text(p.os),
            p.python_version,
            p.backend,
            f"{p.default_memory_budget_bytes >> 20} MiB",
            f"{p.memory_max_bytes >> 20} MiB",
        )
    console.print(table)


def _install(bundle: Path, rootfs: Optional[Path], ssh: Optional[str], ssh_port: int, identity: Optional[Path]) -> str:
    """Install a built bundle into a mounted rootfs or over SSH; returns what was done, for the summary."""
    from msfusion.devices.flash import install_bundle, install_over_ssh

    if rootfs is not None:
        install_bundle(bundle, rootfs)
        return f"installed into {rootfs}; the first boot builds /opt/msfusion/venv and starts msfusion-device.service"
    if ssh is not None:
        user, _, host = ssh.rpartition("@")
        install_over_ssh(bundle, host, user or "root", port=ssh_port, identity_file=identity)
        return f"installed on {host}; msfusion-device.service is running"
    return "built only (install it with `msfusion devices install`)"


def _secured(directory: Path, device_id: str) -> dict[str, Any]:
    """DeviceSettings fields from a security folder; enrolls the device (a certificate) if it is not yet."""
    from msfusion.coordinator.security import SecurityDir

    security = SecurityDir(directory)
    if device_id in security.devices():
        creds = security.device_credentials(device_id)
    else:
        creds = security.enroll(device_id)
        console.print(Text(f"enrolled {device_id} in {security.path}: SIGHUP a running broker to let it in"))
    assert creds.result_key is not None
    return {
        "ca_cert": creds.ca,
        "tls_cert": creds.cert,
        "tls_key": creds.key,
        "task_signing_public_key": security.task_signing_public_key.read_text(encoding="utf-8"),
        "result_key": creds.result_key.read_text(encoding="utf-8").strip(),
    }


@devices_app.command("flash")
def devices_flash(
    profile: str = typer.Option(..., "--profile", help="board profile (see `msfusion devices list`)"),
    device_id: str = typer.Option(..., "--device-id"),
    run_id: str = typer.Option(..., "--run-id"),
    broker: str = typer.Option(..., "--broker", help="mqtt://host:port as the board reaches it"),
    out: Path = typer.Option(..., "--out", help="the bundle folder to create"),
    username: Optional[str] = typer.Option(None, "--username", help="the device's broker user"),
    password_file: Optional[Path] = typer.Option(None, "--password-file", help="a file holding its broker password"),
    security: Optional[Path] = typer.Option(
        None,
        "--security",
        help="a folder made by `msfusion security init`: the bundle gets the broker's CA, the device's certificate "
        "(enrolled now if it is not yet), the task-signing public key and its result key",
    ),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="e.g. '1.5 GiB' (default: the profile's)"
    ),
    max_width_ratio: Optional[float] = typer.Option(None, "--max-width-ratio"),
    shard: Optional[Path] = typer.Option(
        None, "--shard", help="a data shard folder to ship (from `msfusion partition`)"
    ),
    no_backend: bool = typer.Option(False, "--no-backend", help="core runtime only (no training backend)"),
    python_version: Optional[str] = typer.Option(None, "--python", help="the board's Python, if not the profile's"),
    board_python: str = typer.Option("python3", "--board-python", help="the interpreter install.sh runs on the board"),
    extra_index_url: list[str] = typer.Option(
        [], "--extra-index-url", help="e.g. https://download.pytorch.org/whl/cpu"
    ),
    find_links: list[str] = typer.Option([], "--find-links", help="a local folder of wheels"),
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="a TOML file of your own board profiles"),
    rootfs: Optional[Path] = typer.Option(None, "--rootfs", help="also install into this mounted root filesystem"),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="also install over SSH on HOST or USER@HOST"),
    ssh_port: int = typer.Option(22, "--ssh-port"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="SSH private key"),
    log_level: str = typer.Option("WARNING", "--log-level"),
) -> None:
    """Build a board's install bundle (wheelhouse, device.toml, systemd units, install.sh); optionally install it.

    Exit codes: 0 success, 2 config, 5 bundle build or install failed.
    """
    from msfusion.devices.flash import BundleOptions, DeviceSettings, build_bundle
    from msfusion.devices.profiles import get_profile, parse_bytes
    from msfusion.devices.wheelhouse import WheelSources

    setup_logging(log_level, None)
    with cli_errors():
        if rootfs is not None and ssh is not None:
            raise ConfigError("give --rootfs or --ssh, not both")
        board = get_profile(profile, profiles)
        password = password_file.read_text(encoding="utf-8").strip() if password_file is not None else None
        secured = _secured(security, device_id) if security is not None else {}
        settings = DeviceSettings(
            device_id=device_id,
            run_id=run_id,
            broker_url=broker,
            username=username,
            password=password,
            memory_budget_bytes=parse_bytes(memory_budget, "--memory-budget") if memory_budget else None,
            max_width_ratio=max_width_ratio,
            **secured,
        )
        options = BundleOptions(
            sources=WheelSources(extra_index_urls=tuple(extra_index_url), find_links=tuple(find_links)),
            include_backend=not no_backend,
            python_version=python_version,
            board_python=board_python,
            shard_dir=shard,
        )
        with progress_bars() as progress:
            manifest = build_bundle(board, settings, out, options, progress=progress)
        done = _install(out, rootfs, ssh, ssh_port, identity)
    size = sum(w.size_bytes for w in manifest.wheels)
    console.print(
        Text(
            f"bundle {out}: {manifest.device_id} on {manifest.profile} ({manifest.arch}, Python "
            f"{manifest.python_version}, backend {manifest.backend if manifest.backend_included else 'none'}), "
            f"{len(manifest.wheels)} wheels, {size / 2**20:.0f} MiB; {done}"
        )
    )


@devices_app.command("install")
def devices_install(
    bundle: Path = typer.Option(..., "--bundle", help="a bundle built by `msfusion devices flash`"),
    rootfs: Optional[Path] = typer.Option(None, "--rootfs", help="a mounted root filesystem"),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="HOST or USER@HOST of a running board"),
    ssh_port: int = typer.Option(22, "--ssh-port"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="SSH private key"),
) -> None:
    """Install a built bundle into a mounted root filesystem or over SSH.

    Exit codes: 0 success, 2 config (not a root filesystem, or one of another architecture),
    5 not a bundle, or the install failed.
    """
    with cli_errors():
        if (rootfs is None) == (ssh is None):
            raise ConfigError("give exactly one of --rootfs and --ssh")
        done = _install(bundle, rootfs, ssh, ssh_port, identity)
    console.print(Text(done))


@devices_app.command("profile-set")
def devices_profile_set(
    config: Path = typer.Option(..., "--config", help="the run file (TOML) the devices will train"),
    out: Path = typer.Option(..., "--out", help="the folder to write (copy it to the boards)"),
    widths: str = typer.Option("1,0.5,0.25,0.125", help="width ratios"),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="default: the run's batch size"),
    backends: Optional[str] = typer.Option(
        None,
        "--backends",
        help="artifact kinds, comma-separated: one set per kind in OUT/<kind>/, each board profiles those it "
        "runs (default: the run's backend, in OUT)",
    ),
) -> None:
    """Export the artifacts a board profiles (`msfusion-device profile --artifacts DIR`).

    Exit codes: 0 success, 1 an export or its validation failed, 2 config.
    """
    from msfusion.coordinator.fleet.artifacts import export_profile_set
    from msfusion.coordinator.fleet.config import load_config

    with cli_errors():
        cfg = load_config(config)
        ratios = parse_list(widths, "--widths", float, "width ratios", "1,0.5,0.25")
        batches = (
            parse_list(batch_sizes, "--batch-sizes", positive_int, "positive integers", "16,32")
            if batch_sizes
            else (cfg.engine.local.batch_size,)
        )
        kinds = [check_backend(k) for k in backends.split(",") if k] if backends else []
        with progress_bars() as progress:
            sets = [
                export_profile_set(
                    cfg.engine,
                    kind,
                    ratios,
                    batches,
                    out / kind if kinds else out,
                    cfg.artifact_cache,
                    progress=progress,
                )
                for kind in kinds or [cfg.backend]
            ]
    for profile_set in sets:
        console.print(
            Text(
                f"profile set {profile_set.root}: {len(profile_set.points)} {profile_set.kind} artifacts of model "
                f"{profile_set.model_key[:12]}"
            )
        )
