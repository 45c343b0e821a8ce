"""The `msfusion` command: thin wiring from flags to one library call each, with named exit codes.

    msfusion coordinator run --config run.toml [--resume] [--rounds N] [--broker URL] [--out DIR]
    msfusion simulate --devices 8 --rounds 10 --out runs/sim [--broker mqtt://host:port] [--backend ort]
    msfusion partition --devices 8 --out shards/ [--scheme dirichlet --alpha 0.5]
    msfusion train --devices 8 --rounds 10 --out runs/ref      (the in-process reference engine)
    msfusion devices list [--profiles boards.toml]
    msfusion devices flash --profile rpi4-4gb --device-id dev003 --run-id fmnist --broker mqtt://10.0.0.1:1883 \
        --out bundles/dev003 [--rootfs /media/rootfs | --ssh pi@dev003.local]
    msfusion devices install --bundle bundles/dev003 (--rootfs DIR | --ssh [user@]host)
    msfusion devices profile-set --config run.toml --out profile-set/ [--widths 1,0.5,0.25,0.125]
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.text import Text

from msfusion.errors import (
    BundleError,
    ConfigError,
    DataError,
    MsfusionError,
)

if TYPE_CHECKING:
    from msfusion.models.config import ModelConfig
    from msfusion.recipe import EngineConfig


class ExitCode(enum.IntEnum):
    """What the process exit status means."""

    SUCCESS = 0
    RUN_FAILED = 1  # a round stayed below quorum, or too few devices came
    CONFIG_ERROR = 2
    BROKER_UNAVAILABLE = 3
    DATA_ERROR = 4
    FLASH_FAILED = 5  # a bundle could not be built or installed
    INTERRUPTED = 130


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="msfusion: train a model across a fleet of edge boards."
)
coordinator_app = typer.Typer(no_args_is_help=True, help="The coordinator service.")
app.add_typer(coordinator_app, name="coordinator")
devices_app = typer.Typer(
    no_args_is_help=True, help="Board profiles, profiling artifacts, flashing the device runtime."
)
app.add_typer(devices_app, name="devices")
console = Console()


def _setup_logging(level: str, log_file: Path | None) -> None:
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    else:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def _exit_for(exc: BaseException) -> ExitCode:
    from msfusion.wire.transport import BrokerUnavailable

    if isinstance(exc, BrokerUnavailable):
        return ExitCode.BROKER_UNAVAILABLE
    if isinstance(exc, BundleError):
        return ExitCode.FLASH_FAILED
    if isinstance(exc, DataError):
        return ExitCode.DATA_ERROR
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG_ERROR
    if isinstance(exc, (ValueError, ArithmeticError, OSError)):
        return ExitCode.CONFIG_ERROR  # a malformed flag value (also "1/0"), an unreadable file
    return ExitCode.RUN_FAILED  # DeviceLost and the rest


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    """The one place where a command's errors become a message (never a traceback) and an exit code."""
    try:
        yield
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except (MsfusionError, ValueError, ArithmeticError, OSError) as exc:
        # Text, not markup: an error naming a path or a `[table]` must print as it is.
        console.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(_exit_for(exc)) from None


@coordinator_app.command("run")
def coordinator_run(
    config: Path = typer.Option(..., "--config", help="run file (TOML), see coordinator/fleet/config.py"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
    rounds: Optional[int] = typer.Option(None, help="override engine.rounds"),
    broker: Optional[str] = typer.Option(None, help="override the broker URL"),
    out: Optional[Path] = typer.Option(None, help="override the output folder"),
    min_devices: Optional[int] = typer.Option(None, "--min-devices", help="override fleet.min_devices"),
    deadline_s: Optional[float] = typer.Option(None, "--deadline-s", help="override round.deadline_s"),
    quorum: Optional[float] = typer.Option(None, help="override round.quorum"),
    log_level: str = typer.Option("INFO", "--log-level"),
    quiet: bool = typer.Option(False, "--quiet", help="no live progress display"),
    keep_devices: bool = typer.Option(False, "--keep-devices", help="do not tell devices to stop at the end"),
) -> None:
    """Run rounds over the registered fleet until done; write metrics, checkpoints, model and summary."""
    from msfusion.coordinator.cli.console import RichProgress, print_summary
    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
    from msfusion.coordinator.fleet.config import load_config
    from msfusion.coordinator.fleet.runner import run_coordinator

    with _cli_errors():
        overrides = {
            "rounds": rounds,
            "broker": broker,
            "out": str(out) if out else None,
            "fleet.min_devices": min_devices,
            "round.deadline_s": deadline_s,
            "round.quorum": quorum,
        }
        cfg = load_config(config, overrides)
        _setup_logging(log_level, cfg.out / "logs" / "coordinator.log")
        artifacts = ExportedArtifacts(cfg.engine, cfg.backend, cache_dir=cfg.artifact_cache)
        if quiet:
            summary = run_coordinator(cfg, artifacts, resume=resume, stop_devices=not keep_devices)
        else:
            with RichProgress(cfg.engine.rounds) as progress:
                summary = run_coordinator(
                    cfg, artifacts, resume=resume, progress=progress, stop_devices=not keep_devices
                )
    print_summary(summary, console)
    raise typer.Exit(ExitCode.SUCCESS if summary.ok else ExitCode.RUN_FAILED)


def _engine(
    model: str, channels: str | None, strategy: str, contrastive: str, rounds: int, seed: int, local_samples: int
) -> "EngineConfig":
    """The algorithm's knobs from the flags `simulate` and `train` share."""
    from msfusion.algorithm.planning import PlanConfig, Strategy
    from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
    from msfusion.recipe import EngineConfig, LocalTrainConfig

    try:
        plan = PlanConfig(strategy=Strategy(strategy))
        variant = ContrastiveVariant(
            "moon"
            if contrastive == "auto" and strategy == "msfusion"
            else "off"
            if contrastive == "auto"
            else contrastive
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    dims: dict[str, Any] = {"channels": tuple(int(c) for c in channels.split(","))} if channels else {}
    return EngineConfig(
        model=ModelConfig(arch=model, **dims),
        plan=plan,
        local=LocalTrainConfig(max_samples=local_samples),
        loss=LossConfig(variant=variant),
        rounds=rounds,
        seed=seed,
        eval_expected=True,  # the co-hold weighted model is a candidate for the deployable one
    )


def board_ratio(model: "ModelConfig", share: float) -> float | None:
    """The width a simulated board gets when its memory for model state is `share` of the full model's.

    The coordinator's parameter-budget rule (`coordinator/fleet/registry.py`,
    `ratio_for_memory`) on a budget of the runtime's bytes plus `share` of the
    full model's training bytes: the width a real board of that size would be
    given. The demo CNN is far smaller than any board's runtime, so a simulated
    process's own memory cannot make the split; this makes it, by the same rule.
    """
    from msfusion.coordinator.fleet.registry import BYTES_PER_PARAM, RUNTIME_BYTES, ratio_for_memory
    from msfusion.models.registry import model_spec

    if not 0 < share <= 1:
        raise ConfigError(f"--board-share must be in (0, 1], got {share}")
    if share == 1:
        return None
    spec = model_spec(model)
    return ratio_for_memory(spec, RUNTIME_BYTES + int(share * BYTES_PER_PARAM * spec.param_count()))


@app.command()
def simulate(
    devices: int = typer.Option(8, help="number of device processes"),
    rounds: int = typer.Option(10),
    out: Path = typer.Option(Path("runs/simulate"), help="output folder"),
    broker: Optional[str] = typer.Option(None, help="use this broker (mqtt://host:port) instead of a private one"),
    model: str = typer.Option("cnn", help="cnn or resnet (Fashion-MNIST)"),
    channels: Optional[str] = typer.Option(None, help="conv widths, e.g. 8,16,32"),
    strategy: str = typer.Option("msfusion", help="msfusion, fedrolex, heterofl, feddropout or fedavg"),
    contrastive: str = typer.Option("auto", help="off, positive, moon (auto: moon for msfusion)"),
    backend: str = typer.Option("ort", help="ort or executorch"),
    budget_mb: int = typer.Option(1024, "--budget-mb", help="each device's memory budget"),
    max_width_ratio: Optional[float] = typer.Option(None, "--max-width-ratio", help="width cap every device reports"),
    board_share: str = typer.Option(
        "1/16",
        "--board-share",
        help="each simulated board affords this share of the model's parameters (the coordinator's memory rule "
        "turns it into the board's width; 1: whole boards)",
    ),
    samples_per_device: int = typer.Option(0, help="cap each shard (0: all)"),
    local_samples: int = typer.Option(1000, help="samples per local epoch"),
    deadline_s: float = typer.Option(120.0, "--deadline-s"),
    seed: int = typer.Option(0),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Partition Fashion-MNIST, start N device daemons and a coordinator, train end to end."""
    from msfusion.coordinator.cli.console import RichProgress, print_summary
    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
    from msfusion.coordinator.fleet.config import RoundConfig
    from msfusion.coordinator.fleet.local_fleet import PartitionConfig, SimulationConfig
    from msfusion.coordinator.fleet.local_fleet import simulate as run_simulation

    with _cli_errors():
        engine = _engine(model, channels, strategy, contrastive, rounds, seed, local_samples)
        board_cap = board_ratio(engine.model, float(Fraction(board_share)))
        caps = [c for c in (max_width_ratio, board_cap) if c is not None]
        cfg = SimulationConfig(
            engine=engine,
            partition=PartitionConfig(
                devices=devices, seed=seed, samples_per_device=samples_per_device, validation_samples=1000
            ),
            out=out,
            broker=broker,
            backend=backend,
            memory_budget_bytes=budget_mb << 20,
            max_width_ratio=min(caps) if caps else None,
            round=RoundConfig(deadline_s=deadline_s),
        )
        _setup_logging(log_level, out / "logs" / "coordinator.log")
        with RichProgress(rounds) as progress:
            summary = run_simulation(cfg, ExportedArtifacts(engine, backend), progress)
    print_summary(summary, console)
    raise typer.Exit(ExitCode.SUCCESS if summary.ok else ExitCode.RUN_FAILED)


@app.command()
def plan(
    devices: int = typer.Option(..., "--devices", help="devices in the fleet"),
    budget: str = typer.Option(..., "--budget", help="share of the full model's parameters one device affords"),
    model: str = typer.Option("cnn", help="cnn, resnet or charlm"),
    channels: Optional[str] = typer.Option(None, help="conv widths, e.g. 32,64,128"),
    measured: Optional[Path] = typer.Option(None, help="figures to advise from (default: the shipped ones)"),
) -> None:
    """Recommend a strategy for a fleet, from the scaling benchmark's measured figures, and say why."""
    from msfusion.algorithm.spec import ratio_for_budget, widths_for_ratio
    from msfusion.coordinator.fleet.advice import advise, case_of, load_measured
    from msfusion.models.config import ModelConfig
    from msfusion.models.registry import model_spec

    with _cli_errors():
        share = float(Fraction(budget))
        dims: dict[str, Any] = {"channels": tuple(int(c) for c in channels.split(","))} if channels else {}
        model_cfg = ModelConfig(arch=model, **dims)
        spec = model_spec(model_cfg)
        ratio = ratio_for_budget(spec, share)
        held = spec.param_count(widths_for_ratio(spec, ratio))
        advice = advise(devices, share, ratio, load_measured(measured), case_of(model_cfg))
    console.print(
        Text(
            f"{devices} devices, each affording {share:.4g} of a {spec.param_count():,}-parameter {model}: "
            f"width {ratio:.3f} of every group, {held:,} parameters per device"
        )
    )
    console.print(Text.assemble(("recommended: ", "bold"), advice.strategy))
    console.print(Text(f"why: {advice.reason}"))


@app.command()
def partition(
    devices: int = typer.Option(8),
    out: Path = typer.Option(..., help="folder for dev000/ ... and test/"),
    scheme: str = typer.Option("dirichlet", help="dirichlet or iid"),
    alpha: float = typer.Option(0.5),
    seed: int = typer.Option(0),
    samples_per_device: int = typer.Option(0),
    test_samples: int = typer.Option(2000),
) -> None:
    """Write Fashion-MNIST device shards (the format msfusion/data/shards.py reads) and a test shard."""
    from msfusion.coordinator.fleet.local_fleet import PartitionConfig, partition_fmnist

    with _cli_errors():
        shards = partition_fmnist(
            PartitionConfig(
                devices=devices,
                scheme=scheme,
                alpha=alpha,
                seed=seed,
                samples_per_device=samples_per_device,
                test_samples=test_samples,
            ),
            out,
        )
    console.print(f"wrote {len(shards.devices)} device shards and {shards.test}")


@app.command()
def train(
    devices: int = typer.Option(8),
    rounds: int = typer.Option(10),
    out: Path = typer.Option(Path("runs/reference")),
    model: str = typer.Option("cnn"),
    channels: Optional[str] = typer.Option(None),
    strategy: str = typer.Option("msfusion", help="msfusion, fedrolex, heterofl, feddropout or fedavg"),
    contrastive: str = typer.Option("auto", help="off, positive, moon (auto: moon for msfusion)"),
    ratio: Optional[float] = typer.Option(None, help="every device's width ratio (default: from --board-share)"),
    board_share: str = typer.Option("1/16", "--board-share", help="as in `simulate`: each device's parameter share"),
    samples_per_device: int = typer.Option(0),
    local_samples: int = typer.Option(1000),
    seed: int = typer.Option(0),
) -> None:
    """The in-process reference engine (no MQTT) on the same partition `simulate` uses."""
    from msfusion.coordinator.fleet.local_fleet import (
        PartitionConfig,
        load_shard_set,
        partition_fmnist,
    )
    from msfusion.coordinator.reference.engine import ReferenceEngine
    from msfusion.data.datasets import ArrayDataset
    from msfusion.data.shards import read_shard
    from msfusion.wire.weights import pack_weights

    with _cli_errors():
        engine_cfg = _engine(model, channels, strategy, contrastive, rounds, seed, local_samples)
        shards = partition_fmnist(
            PartitionConfig(devices=devices, seed=seed, samples_per_device=samples_per_device, validation_samples=1000),
            out / "shards",
        )
        data, test = load_shard_set(shards)
        assert shards.validation is not None
        x, y, _ = read_shard(shards.validation)
        if ratio is None:
            ratio = board_ratio(engine_cfg.model, float(Fraction(board_share))) or 1.0
        engine = ReferenceEngine(engine_cfg, data, test, [ratio] * devices, validation=ArrayDataset(x, y))
        with open(out / "metrics.jsonl", "w", encoding="utf-8") as handle:
            for record in engine.run():
                handle.write(
                    json.dumps(
                        {
                            "round_idx": record.round_idx,
                            "metrics": dict(record.metrics),
                            "overlap": record.overlap,
                            "wall_s": record.wall_s,
                        }
                    )
                    + "\n"
                )
                console.print(f"round {record.round_idx + 1}: {dict(record.metrics)}")
        deployable, weights = engine.deployable_weights()
        (out / "model.safetensors").write_bytes(pack_weights(weights))
    console.print(f"model ({deployable}, chosen on the validation shard): {out / 'model.safetensors'}")


@devices_app.command("list")
def devices_list(
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="a TOML file of your own board profiles"),
) -> None:
    """The board profiles: architecture, RAM, backend, the runtime's budget and the unit's hard cap."""
    from rich.table import Table

    from msfusion.devices.profiles import load_profiles

    with _cli_errors():
        known = load_profiles(profiles)
    table = Table("profile", "arch", "RAM", "cores", "OS", "Python", "backend", "budget", "MemoryMax")
    for p in sorted(known.values(), key=lambda p: p.name):
        table.add_row(
            p.name,
            p.arch,
            f"{p.ram_bytes / 2**30:.0f} GiB",
            str(p.cores),
            p.os,
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


@devices_app.command("flash")
def devices_flash(
    profile: str = typer.Option(..., "--profile", help="board profile (see `msfusion devices list`)"),
    device_id: str = typer.Option(..., "--device-id"),
    run_id: str = typer.Option(..., "--run-id"),
    broker: str = typer.Option(..., "--broker", help="mqtt://host:port as the board reaches it"),
    out: Path = typer.Option(..., "--out", help="the bundle folder to create"),
    username: Optional[str] = typer.Option(None, "--username", help="the device's broker user"),
    password_file: Optional[Path] = typer.Option(None, "--password-file", help="a file holding its broker password"),
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
    ssh: Optional[str] = typer.Option(None, "--ssh", help="also install over SSH on [user@]host"),
    ssh_port: int = typer.Option(22, "--ssh-port"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="SSH private key"),
    log_level: str = typer.Option("WARNING", "--log-level"),
) -> None:
    """Build a board's install bundle (wheelhouse, device.toml, systemd units, install.sh); optionally install it."""
    from msfusion.devices.flash import BundleOptions, DeviceSettings, build_bundle
    from msfusion.devices.profiles import get_profile, parse_bytes
    from msfusion.devices.wheelhouse import WheelSources

    _setup_logging(log_level, None)
    with _cli_errors():
        if rootfs is not None and ssh is not None:
            raise ConfigError("give --rootfs or --ssh, not both")
        board = get_profile(profile, profiles)
        password = password_file.read_text(encoding="utf-8").strip() if password_file is not None else None
        settings = DeviceSettings(
            device_id=device_id,
            run_id=run_id,
            broker_url=broker,
            username=username,
            password=password,
            memory_budget_bytes=parse_bytes(memory_budget, "--memory-budget") if memory_budget else None,
            max_width_ratio=max_width_ratio,
        )
        options = BundleOptions(
            sources=WheelSources(extra_index_urls=tuple(extra_index_url), find_links=tuple(find_links)),
            include_backend=not no_backend,
            python_version=python_version,
            board_python=board_python,
            shard_dir=shard,
        )
        manifest = build_bundle(board, settings, out, options)
        done = _install(out, rootfs, ssh, ssh_port, identity)
    size = sum(w.size_bytes for w in manifest.wheels)
    console.print(
        f"bundle {out}: {manifest.device_id} on {manifest.profile} ({manifest.arch}, Python "
        f"{manifest.python_version}, backend {manifest.backend if manifest.backend_included else 'none'}), "
        f"{len(manifest.wheels)} wheels, {size / 2**20:.0f} MiB; {done}"
    )


@devices_app.command("install")
def devices_install(
    bundle: Path = typer.Option(..., "--bundle", help="a bundle built by `msfusion devices flash`"),
    rootfs: Optional[Path] = typer.Option(None, "--rootfs", help="a mounted root filesystem"),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="[user@]host of a running board"),
    ssh_port: int = typer.Option(22, "--ssh-port"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="SSH private key"),
) -> None:
    """Install a built bundle into a mounted root filesystem or over SSH."""
    with _cli_errors():
        if (rootfs is None) == (ssh is None):
            raise ConfigError("give exactly one of --rootfs and --ssh")
        done = _install(bundle, rootfs, ssh, ssh_port, identity)
    console.print(done)


@devices_app.command("profile-set")
def devices_profile_set(
    config: Path = typer.Option(..., "--config", help="the run file (TOML) the devices will train"),
    out: Path = typer.Option(..., "--out", help="the folder to write (copy it to the boards)"),
    widths: str = typer.Option("1,0.5,0.25,0.125", help="width ratios"),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="default: the run's batch size"),
) -> None:
    """Export the artifacts a board profiles (`msfusion-device profile --artifacts DIR`)."""
    from msfusion.coordinator.fleet.artifacts import export_profile_set
    from msfusion.coordinator.fleet.config import load_config

    with _cli_errors():
        cfg = load_config(config)
        ratios = [float(w) for w in widths.split(",") if w.strip()]
        batches = (
            [int(b) for b in batch_sizes.split(",") if b.strip()] if batch_sizes else [cfg.engine.local.batch_size]
        )
        profile_set = export_profile_set(cfg.engine, cfg.backend, ratios, batches, out, cache_dir=cfg.artifact_cache)
    console.print(
        f"profile set {out}: {len(profile_set.points)} {profile_set.kind} artifacts of model "
        f"{profile_set.model_key[:12]}"
    )


def main() -> None:
    """Console-script entry point (`msfusion`)."""
    app()


if __name__ == "__main__":
    main()
