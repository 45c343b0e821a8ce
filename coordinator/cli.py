"""The `msfusion` command: thin wiring from flags to one library call each, with named exit codes.

    msfusion coordinator run --config run.toml [--resume] [--rounds N] [--broker URL] [--out DIR]
    msfusion simulate --devices 8 --rounds 10 --out runs/sim [--broker mqtt://host:port] [--backend ort]
    msfusion partition --devices 8 --out shards/ [--scheme dirichlet --alpha 0.5]
    msfusion train --devices 8 --rounds 10 --out runs/ref      (the in-process reference engine)
"""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from msfusion.errors import ConfigError, DataError, DeviceLost, MsfusionError

if TYPE_CHECKING:
    from msfusion.coordinator.engine import EngineConfig


class ExitCode(enum.IntEnum):
    """What the process exit status means."""

    SUCCESS = 0
    RUN_FAILED = 1  # a round stayed below quorum, or too few devices came
    CONFIG_ERROR = 2
    BROKER_UNAVAILABLE = 3
    DATA_ERROR = 4
    INTERRUPTED = 130


app = typer.Typer(add_completion=False, no_args_is_help=True, help="msfusion: train a model across a fleet of edge boards.")
coordinator_app = typer.Typer(no_args_is_help=True, help="The coordinator service.")
app.add_typer(coordinator_app, name="coordinator")
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
    from msfusion.edge_runtime.transport import BrokerUnavailable

    if isinstance(exc, BrokerUnavailable):
        return ExitCode.BROKER_UNAVAILABLE
    if isinstance(exc, DataError):
        return ExitCode.DATA_ERROR
    if isinstance(exc, ConfigError):
        return ExitCode.CONFIG_ERROR
    if isinstance(exc, DeviceLost):
        return ExitCode.RUN_FAILED
    return ExitCode.RUN_FAILED


@coordinator_app.command("run")
def coordinator_run(
    config: Path = typer.Option(..., "--config", help="run file (TOML), see coordinator/config.py"),
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
    from msfusion.coordinator.artifacts import ExportedArtifacts
    from msfusion.coordinator.config import load_config
    from msfusion.coordinator.console import RichProgress, print_summary
    from msfusion.coordinator.runner import run_coordinator

    try:
        overrides = {"rounds": rounds, "broker": broker, "out": str(out) if out else None,
                     "fleet.min_devices": min_devices, "round.deadline_s": deadline_s, "round.quorum": quorum}  # fmt: skip
        cfg = load_config(config, overrides)
        _setup_logging(log_level, cfg.out / "logs" / "coordinator.log")
        artifacts = ExportedArtifacts(cfg.engine, cfg.backend, cache_dir=cfg.artifact_cache)
        if quiet:
            summary = run_coordinator(cfg, artifacts, resume=resume, stop_devices=not keep_devices)
        else:
            with RichProgress(cfg.engine.rounds) as progress:
                summary = run_coordinator(cfg, artifacts, resume=resume, progress=progress, stop_devices=not keep_devices)
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED)
    except MsfusionError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(_exit_for(exc))
    print_summary(summary, console)
    raise typer.Exit(ExitCode.SUCCESS if summary.ok else ExitCode.RUN_FAILED)


def _engine(model: str, channels: str | None, strategy: str, contrastive: str, rounds: int, seed: int,
            local_samples: int) -> "EngineConfig":  # fmt: skip
    """The algorithm's knobs from the flags `simulate` and `train` share."""
    from msfusion.coordinator.engine import EngineConfig, LocalTrainConfig, LossConfig
    from msfusion.coordinator.loss import ContrastiveVariant
    from msfusion.coordinator.models import ModelConfig
    from msfusion.coordinator.planning import PlanConfig, Strategy

    try:
        plan = PlanConfig(strategy=Strategy(strategy))
        variant = ContrastiveVariant("moon" if contrastive == "auto" and strategy == "msfusion" else
                                     "off" if contrastive == "auto" else contrastive)  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    dims = {"channels": tuple(int(c) for c in channels.split(","))} if channels else {}
    return EngineConfig(
        model=ModelConfig(arch=model, **dims),
        plan=plan,
        local=LocalTrainConfig(max_samples=local_samples),
        loss=LossConfig(variant=variant),
        rounds=rounds,
        seed=seed,
    )


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
    samples_per_device: int = typer.Option(0, help="cap each shard (0: all)"),
    local_samples: int = typer.Option(1000, help="samples per local epoch"),
    deadline_s: float = typer.Option(120.0, "--deadline-s"),
    seed: int = typer.Option(0),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Partition Fashion-MNIST, start N device daemons and a coordinator, train end to end."""
    from msfusion.coordinator.artifacts import ExportedArtifacts
    from msfusion.coordinator.config import RoundConfig
    from msfusion.coordinator.console import RichProgress, print_summary
    from msfusion.coordinator.simulate import PartitionConfig, SimulationConfig
    from msfusion.coordinator.simulate import simulate as run_simulation

    try:
        engine = _engine(model, channels, strategy, contrastive, rounds, seed, local_samples)
        cfg = SimulationConfig(
            engine=engine, partition=PartitionConfig(devices=devices, seed=seed, samples_per_device=samples_per_device),
            out=out, broker=broker, backend=backend, memory_budget_bytes=budget_mb << 20,
            max_width_ratio=max_width_ratio, round=RoundConfig(deadline_s=deadline_s),
        )  # fmt: skip
        _setup_logging(log_level, out / "logs" / "coordinator.log")
        with RichProgress(rounds) as progress:
            summary = run_simulation(cfg, ExportedArtifacts(engine, backend), progress)
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.INTERRUPTED)
    except MsfusionError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(_exit_for(exc))
    print_summary(summary, console)
    raise typer.Exit(ExitCode.SUCCESS if summary.ok else ExitCode.RUN_FAILED)


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
    """Write Fashion-MNIST device shards (the format edge_runtime/shards.py reads) and a test shard."""
    from msfusion.coordinator.simulate import PartitionConfig, partition_fmnist

    try:
        shards = partition_fmnist(
            PartitionConfig(devices=devices, scheme=scheme, alpha=alpha, seed=seed,
                            samples_per_device=samples_per_device, test_samples=test_samples), out)  # fmt: skip
    except MsfusionError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(_exit_for(exc))
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
    ratio: float = typer.Option(0.25, help="every device's width ratio"),
    samples_per_device: int = typer.Option(0),
    local_samples: int = typer.Option(1000),
    seed: int = typer.Option(0),
) -> None:
    """The in-process reference engine (no MQTT) on the same partition `simulate` uses."""
    from msfusion.coordinator.engine import ReferenceEngine
    from msfusion.coordinator.simulate import PartitionConfig, load_shard_set, partition_fmnist
    from msfusion.edge_runtime.weights import pack_weights

    try:
        engine_cfg = _engine(model, channels, strategy, contrastive, rounds, seed, local_samples)
        shards = partition_fmnist(PartitionConfig(devices=devices, seed=seed, samples_per_device=samples_per_device), out / "shards")
        data, test = load_shard_set(shards)
        engine = ReferenceEngine(engine_cfg, data, test, [ratio] * devices)
        with open(out / "metrics.jsonl", "w", encoding="utf-8") as handle:
            for record in engine.run():
                handle.write(json.dumps({"round_idx": record.round_idx, "metrics": dict(record.metrics),
                                         "overlap": record.overlap, "wall_s": record.wall_s}) + "\n")  # fmt: skip
                console.print(f"round {record.round_idx + 1}: {dict(record.metrics)}")
        (out / "model.safetensors").write_bytes(pack_weights(engine.weights))
    except MsfusionError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(_exit_for(exc))
    console.print(f"model: {out / 'model.safetensors'}")


def main() -> None:
    """Console-script entry point (`msfusion`)."""
    app()


if __name__ == "__main__":
    main()
