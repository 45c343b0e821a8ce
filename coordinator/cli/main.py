"""The `msfusion` command: thin wiring from flags to one library call each, with named exit codes.

    msfusion coordinator run --config run.toml [--resume] [--rounds N] [--broker URL] [--out DIR]
    msfusion simulate --devices 8 --rounds 10 --out runs/sim [--broker mqtt://host:port] [--backend ort]
        [--engine process|ray [--address auto|HOST:PORT]]
    msfusion partition --devices 8 --out shards/ [--scheme dirichlet --alpha 0.5]
    msfusion train --devices 8 --rounds 10 --out runs/ref      (the in-process reference engine)
    msfusion runs list [--root runs] | show RUN | follow RUN | stop RUN
    msfusion devices list [--profiles boards.toml]
    msfusion devices flash --profile rpi4-4gb --device-id dev003 --run-id fmnist --broker mqtt://10.0.0.1:1883 \
        --out bundles/dev003 [--rootfs /media/rootfs | --ssh pi@dev003.local]
    msfusion devices install --bundle bundles/dev003 (--rootfs DIR | --ssh [user@]host)
    msfusion devices profile-set --config run.toml --out profile-set/ [--widths 1,0.5,0.25,0.125]
    msfusion report RUN_DIR [--benchmark FILE]      (report.html: a run's charts, failures and config)
"""

from __future__ import annotations

import contextlib
import json
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer
from rich.text import Text

from msfusion.coordinator.cli.common import (
    ExitCode,
    check_backend,
    check_rounds,
    cli_errors,
    console,
    parse_channels,
    setup_logging,
    sigterm_as_interrupt,
)
from msfusion.coordinator.cli.devices import devices_app
from msfusion.coordinator.cli.runs import runs_app
from msfusion.coordinator.cli.security import security_app
from msfusion.errors import (
    ConfigError,
)

__all__ = ["ExitCode", "app", "main"]

if TYPE_CHECKING:
    from msfusion.coordinator.fleet.local_fleet import PartitionConfig
    from msfusion.models.config import ModelConfig
    from msfusion.recipe import EngineConfig


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="msfusion: train a model across a fleet of edge boards.\n\n"
    "Exit codes: 0 success, 1 run failed, 2 config, 3 broker unreachable, 4 data, 5 bundle build or install "
    "failed, 130 interrupted (each command's --help says which it uses).",
)
coordinator_app = typer.Typer(no_args_is_help=True, help="The coordinator service.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(devices_app, name="devices")
app.add_typer(runs_app, name="runs")
app.add_typer(security_app, name="security")


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
    dashboard: Optional[str] = typer.Option(
        None, "--dashboard", help="serve the live dashboard on [HOST:]PORT (127.0.0.1 unless given; a token elsewhere)"
    ),
    dashboard_cert: Optional[Path] = typer.Option(None, "--dashboard-cert", help="TLS certificate (PEM) for it"),
    dashboard_key: Optional[Path] = typer.Option(None, "--dashboard-key", help="TLS key (PEM) for it"),
    security: Optional[Path] = typer.Option(
        None, "--security", help="a folder made by `msfusion security init`: TLS identity, signed tasks, result keys"
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="allow plain mqtt:// to a broker on another machine (tasks and weights in clear)"
    ),
) -> None:
    """Run rounds over the registered fleet until done; write metrics, checkpoints, model and summary.

    Exit codes: 0 success, 1 run failed (a round below quorum, too few devices admitted), 2 config,
    3 broker unreachable, 4 data, 130 interrupted or stopped by `msfusion runs stop`.
    """
    from msfusion.coordinator.cli.console import RichProgress, print_summary
    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
    from msfusion.coordinator.fleet.config import load_config
    from msfusion.coordinator.fleet.runner import run_coordinator

    with cli_errors():
        overrides = {
            "rounds": rounds,
            "broker": broker,
            "out": str(out) if out else None,
            "fleet.min_devices": min_devices,
            "round.deadline_s": deadline_s,
            "round.quorum": quorum,
            "security": str(security) if security else None,
            "insecure": True if insecure else None,
        }
        cfg = load_config(config, overrides)
        setup_logging(log_level, cfg.out / "logs" / "coordinator.log")
        artifacts = ExportedArtifacts(cfg.engine, cfg.backend, cache_dir=cfg.artifact_cache)
        with serve_dashboard(dashboard, cfg.out, dashboard_cert, dashboard_key) as watch:
            if quiet:
                summary = run_coordinator(cfg, artifacts, resume=resume, stop_devices=not keep_devices, on_events=watch)
            else:
                with RichProgress(cfg.engine.rounds) as progress:
                    artifacts.progress = progress.step  # a bar per artifact export and validation
                    summary = run_coordinator(
                        cfg, artifacts, resume=resume, progress=progress, stop_devices=not keep_devices, on_events=watch
                    )
    print_summary(summary, console)
    raise typer.Exit(run_exit_code(summary))


@contextlib.contextmanager
def serve_dashboard(
    bind: str | None, out: Path, cert: Path | None = None, key: Path | None = None
) -> Iterator[Callable[[Any], None] | None]:
    """Serve the dashboard for the run in `out` while the block runs; yields the run's `on_events` hook.

    Prints the URL (and, when bound beyond loopback, the token once; it is also kept 0600 in
    `out/dashboard.token`). `bind` None or "off": no dashboard.
    """
    if bind is None or bind == "off":
        yield None
        return
    from msfusion.coordinator.dashboard.app import RunsView
    from msfusion.coordinator.dashboard.server import Dashboard, DashboardOptions, parse_bind

    host, port = parse_bind(bind)
    view = RunsView(root=out.resolve().parent)
    server = Dashboard(view, DashboardOptions(host, port, tls_cert=cert, tls_key=key), token_dir=out).start()
    console.print(Text(f"dashboard: {server.url}", style="bold"))
    if server.generated_token:
        console.print(Text(f"dashboard token (shown once; kept in {out / 'dashboard.token'}): {server.token}"))
    try:
        yield lambda events: view.add_live(events_run_id(events), events)
    finally:
        server.stop()


def events_run_id(events: Any) -> str:
    """The run id a live event stream is listed under (its run_started event's, else its folder's name)."""
    for event in events.since(0)[::-1]:
        if event.get("kind") == "run_started":
            return str(event["run_id"])
    return str(events.out.name)


def run_exit_code(summary: Any) -> ExitCode:
    """0 finished, 130 stopped by `msfusion runs stop` (resumable), 1 failed."""
    if summary.ok:
        return ExitCode.SUCCESS
    return ExitCode.INTERRUPTED if summary.state == "stopped" else ExitCode.RUN_FAILED


def _engine(
    model: str,
    channels: str | None,
    strategy: str,
    contrastive: str,
    rounds: int,
    seed: int,
    local_samples: int,
    geometry: dict[str, Any] | None = None,
    lr: float | None = None,
) -> "EngineConfig":
    """The algorithm's knobs from the flags `simulate` and `train` share (`geometry`: the data's, see `fit_model`)."""
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
    dims: dict[str, Any] = {"channels": widths} if (widths := parse_channels(channels)) else {}
    local = LocalTrainConfig(max_samples=local_samples)
    if lr is not None:
        from dataclasses import replace

        local = replace(local, lr=lr)
    return EngineConfig(
        model=ModelConfig(arch=model, **dims, **(geometry or {})),
        plan=plan,
        local=local,
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


def fit_model(model: str, shards: Any) -> dict[str, Any]:
    """The model's input geometry from the partitioned data (each device's report), or a clear error.

    Images give the channels, side and number of classes; text the vocabulary
    size (its distinct characters and one out-of-vocabulary id, at most 128).
    """
    from msfusion.data.sources import open_source

    reports = [open_source(shards.device_data(i)).report() for i in range(len(shards.devices))]
    task = "lm" if model == "charlm" else "classification"
    found = {r.task for r in reports}
    if found != {task}:
        kind = "text" if "lm" in found else "images"
        raise ConfigError(
            f"the data set {shards.name!r} is {kind}, and --model {model} trains "
            f"{'text (the char-LM)' if task == 'lm' else 'images'}: "
            f"{'use --model cnn or resnet' if kind == 'images' else 'use --model charlm'}"
        )
    if task == "lm":
        chars = {ch for r in reports for ch in r.char_counts}
        return {"vocab_size": min(len(chars) + 1, 128)} if chars else {}
    names = {n for r in reports for n in r.class_counts}
    classes = max(int(n) for n in names) + 1 if all(n.isdigit() for n in names) else len(names)
    c, h, _ = reports[0].sample_shape
    return {"in_channels": c, "image_size": h, "num_classes": max(classes, 2)}


def _partition(
    devices: int, seed: int, samples_per_device: int, partition: str, data: Path | None, validation: int
) -> "PartitionConfig":
    from msfusion.coordinator.fleet.local_fleet import PartitionConfig, parse_partition
    from msfusion.data.sources import DataSpec

    scheme, alpha, per_device = parse_partition(partition)
    return PartitionConfig(
        devices=devices,
        scheme=scheme,
        alpha=alpha,
        shards_per_device=per_device,
        seed=seed,
        samples_per_device=samples_per_device,
        validation_samples=validation,
        data=DataSpec(data) if data is not None else None,
    )


@app.command()
def simulate(
    devices: int = typer.Option(8, help="number of simulated devices"),
    launcher: str = typer.Option(
        "process",
        "--engine",
        help="how the devices run: process (one OS process each, here) or ray (one Ray actor each, in a Ray cluster)",
    ),
    ray_address: str = typer.Option(
        "auto", "--address", help="--engine ray: auto (a running Ray cluster, else a local one) or HOST:PORT"
    ),
    rounds: int = typer.Option(10),
    out: Path = typer.Option(Path("runs/simulate"), help="output folder"),
    broker: Optional[str] = typer.Option(None, help="use this broker (mqtt://host:port) instead of a private one"),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="the private broker without TLS, ACL, signed tasks or result keys (default: throw-away credentials)",
    ),
    model: str = typer.Option("cnn", help="cnn or resnet (images), charlm (text)"),
    channels: Optional[str] = typer.Option(None, help="conv widths, e.g. 8,16,32"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="the data set to share out (any format msfusion reads; default Fashion-MNIST)"
    ),
    partition: str = typer.Option("dirichlet:0.5", "--partition", help="iid, dirichlet:ALPHA, shards:K or natural"),
    strategy: str = typer.Option("msfusion", help="msfusion, fedrolex, heterofl, feddropout or fedavg"),
    contrastive: str = typer.Option("auto", help="off, positive, moon (auto: moon for msfusion)"),
    backend: str = typer.Option("ort", help="ort, executorch or torch"),
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
    dashboard: str = typer.Option(
        "127.0.0.1:0", "--dashboard", help="serve the live dashboard on [HOST:]PORT (0: a free port; off: none)"
    ),
) -> None:
    """Share out a data set (Fashion-MNIST by default), start N device daemons and a coordinator, train end to end.

    The daemons run as local processes, or with --engine ray as Ray actors (each reserving its budget as
    Ray's memory resource); the broker and the coordinator run here either way.

    Exit codes: 0 success, 1 run failed (a round below quorum, too few devices admitted), 2 config,
    3 broker unreachable, 4 data, 130 interrupted (Ctrl-C or SIGTERM: the daemons and the broker are stopped
    first) or stopped by `msfusion runs stop`.
    """
    from msfusion.coordinator.cli.console import RichProgress, print_summary
    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
    from msfusion.coordinator.fleet.config import RoundConfig
    from msfusion.coordinator.fleet.local_fleet import LAUNCHERS, SimulationConfig, partition_data
    from msfusion.coordinator.fleet.local_fleet import simulate as run_simulation
    from msfusion.coordinator.fleet.ray_fleet import RayOptions

    # SIGTERM (`kill`, a service manager, a test's terminate()) stops the devices and the broker as Ctrl-C does.
    with cli_errors(), sigterm_as_interrupt():
        # The flags first: partitioning the data can take minutes.
        check_rounds(rounds)
        check_backend(backend)
        parse_channels(channels)
        if launcher not in LAUNCHERS:
            raise ConfigError(f"--engine must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
        ray = RayOptions(address=ray_address)
        shares = _partition(devices, seed, samples_per_device, partition, data, 1000)
        shards = partition_data(shares, out / "shards")
        geometry = fit_model(model, shards)
        engine = _engine(model, channels, strategy, contrastive, rounds, seed, local_samples, geometry)
        board_cap = board_ratio(engine.model, float(Fraction(board_share)))
        caps = [c for c in (max_width_ratio, board_cap) if c is not None]
        cfg = SimulationConfig(
            engine=engine,
            partition=shares,
            shards=shards,
            out=out,
            broker=broker,
            backend=backend,
            memory_budget_bytes=budget_mb << 20,
            max_width_ratio=min(caps) if caps else None,
            round=RoundConfig(deadline_s=deadline_s),
            secure=not insecure,
            launcher=launcher,
            ray=ray,
        )
        setup_logging(log_level, out / "logs" / "coordinator.log")
        with serve_dashboard(dashboard, out) as watch, RichProgress(rounds) as progress:
            artifacts = ExportedArtifacts(engine, backend, progress=progress.step)
            summary = run_simulation(cfg, artifacts, progress, on_events=watch)
    print_summary(summary, console)
    raise typer.Exit(run_exit_code(summary))


@app.command()
def plan(
    devices: int = typer.Option(..., "--devices", help="devices in the fleet"),
    budget: str = typer.Option(..., "--budget", help="share of the full model's parameters one device affords"),
    model: str = typer.Option("cnn", help="cnn, resnet or charlm"),
    channels: Optional[str] = typer.Option(None, help="conv widths, e.g. 32,64,128"),
    measured: Optional[Path] = typer.Option(None, help="figures to advise from (default: the shipped ones)"),
) -> None:
    """Recommend a strategy for a fleet, from the scaling benchmark's measured figures, and say why.

    Exit codes: 0 success, 2 config (a bad flag, an unreadable --measured file).
    """
    from msfusion.algorithm.spec import ratio_for_budget, widths_for_ratio
    from msfusion.coordinator.fleet.advice import advise, case_of, load_measured
    from msfusion.models.config import ModelConfig
    from msfusion.models.registry import model_spec

    with cli_errors():
        share = float(Fraction(budget))
        dims: dict[str, Any] = {"channels": widths} if (widths := parse_channels(channels)) else {}
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
    data: Optional[Path] = typer.Option(
        None, "--data", help="the data set (any format msfusion reads; default Fashion-MNIST)"
    ),
    partition: str = typer.Option("dirichlet:0.5", "--partition", help="iid, dirichlet:ALPHA, shards:K or natural"),
    seed: int = typer.Option(0),
    samples_per_device: int = typer.Option(0),
    test_samples: int = typer.Option(2000),
    validation_samples: int = typer.Option(0, help="training samples held out of every device (validation/)"),
) -> None:
    """Share a data set out as device shards (raw pixels, or text files) with a test set: what a device's data reads.

    Exit codes: 0 success, 2 config, 4 data (the data set is unreadable or cannot be shared out).
    """
    from dataclasses import replace

    from msfusion.coordinator.fleet.local_fleet import partition_data

    with cli_errors():
        config = replace(
            _partition(devices, seed, samples_per_device, partition, data, validation_samples),
            test_samples=test_samples,
        )
        shards = partition_data(config, out)
    console.print(
        Text(f"wrote {len(shards.devices)} device folders ({shards.format}) of {shards.name} and {shards.test}")
    )


@app.command()
def train(
    devices: int = typer.Option(8, help="devices in the simulated fleet"),
    rounds: int = typer.Option(10),
    out: Path = typer.Option(Path("runs/reference")),
    model: str = typer.Option("cnn", help="cnn or resnet (images), charlm (text)"),
    channels: Optional[str] = typer.Option(None, help="conv widths, e.g. 32,64,128"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="the data set (any format msfusion reads; default Fashion-MNIST)"
    ),
    partition: str = typer.Option("dirichlet:0.5", "--partition", help="iid, dirichlet:ALPHA, shards:K or natural"),
    strategy: str = typer.Option(
        "msfusion", help="msfusion, fedrolex, heterofl, feddropout, fedavg (the full model) or fedavg-small"
    ),
    contrastive: str = typer.Option("auto", help="off, positive, moon (auto: moon for msfusion)"),
    ratio: Optional[float] = typer.Option(None, help="every device's width ratio (instead of --budget)"),
    budget: str = typer.Option(
        "1/16", "--budget", "--board-share", help="share of the model's parameters each device affords"
    ),
    lr: Optional[float] = typer.Option(None, help="local learning rate (default: the engine's)"),
    threads: int = typer.Option(1, help="torch threads for training"),
    samples_per_device: int = typer.Option(0),
    local_samples: int = typer.Option(1000),
    seed: int = typer.Option(0),
) -> None:
    """The in-process reference engine (no MQTT) on the partition `simulate` would use.

    Exit codes: 0 success, 2 config, 4 data, 130 interrupted.
    """
    from dataclasses import replace

    import torch

    from msfusion.algorithm.planning import Strategy
    from msfusion.algorithm.spec import widths_for_ratio
    from msfusion.coordinator.fleet.local_fleet import load_shard_set, partition_data
    from msfusion.coordinator.reference.engine import ReferenceEngine
    from msfusion.models.registry import model_spec, shrunk_config
    from msfusion.wire.weights import pack_weights

    with cli_errors():
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        check_rounds(rounds)  # the flags before the data is partitioned
        parse_channels(channels)
        torch.set_num_threads(threads)
        small = strategy == "fedavg-small"
        shares = _partition(devices, seed, samples_per_device, partition, data, 1000)
        shards = partition_data(shares, out / "shards")
        geometry = fit_model(model, shards)
        engine_cfg = _engine(
            model, channels, "fedavg" if small else strategy, contrastive, rounds, seed, local_samples, geometry, lr
        )
        spec = model_spec(engine_cfg.model)
        if ratio is None:
            ratio = board_ratio(engine_cfg.model, float(Fraction(budget))) or 1.0
        if not 0 < ratio <= 1:
            raise ConfigError(f"--ratio must be in (0, 1], got {ratio}")
        prepared = load_shard_set(shards, engine_cfg.model)
        trained = engine_cfg
        if small:  # every device trains the whole of a model of the size one device affords
            trained = replace(engine_cfg, model=shrunk_config(engine_cfg.model, ratio))
        elif engine_cfg.plan.strategy is Strategy.FEDAVG and ratio < 1:
            raise ConfigError(
                "--strategy fedavg trains the whole model on every device: drop --ratio/--budget, "
                "or use fedavg-small (a model of the size one device affords)"
            )
        device_ratio = 1.0 if small or engine_cfg.plan.strategy is Strategy.FEDAVG else ratio
        held = model_spec(trained.model).param_count(widths_for_ratio(model_spec(trained.model), device_ratio))
        console.print(
            Text(
                f"{shards.name}: {len(prepared.devices)} devices, {sum(len(d) for d in prepared.devices):,} samples; "
                f"model {engine_cfg.model.arch} of {spec.param_count():,} parameters "
                f"({'trained whole at width ' + format(ratio, '.3f') if small else 'split'}); each device trains "
                f"{held:,} parameters ({held / spec.param_count():.1%} of the model), "
                f"{4 * held / 2**20:.2f} MiB down and up per round"
            )
        )
        engine = ReferenceEngine(
            trained,
            prepared.devices,
            prepared.test,
            [device_ratio] * len(prepared.devices),
            validation=prepared.validation,
        )
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
                console.print(Text(f"round {record.round_idx + 1}: {dict(record.metrics)}"))
        deployable, weights = engine.deployable_weights()
        (out / "model.safetensors").write_bytes(pack_weights(weights))
    chosen = "chosen on the validation set" if prepared.validation is not None else "no validation set"
    console.print(Text(f"model ({deployable}, {chosen}): {out / 'model.safetensors'}"))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run's output folder (finished, failed or crashed)"),
    benchmark: Optional[Path] = typer.Option(
        None,
        help="a benchmark JSON (e.g. bench/results/scaling.json): its other strategies' final figures "
        "are drawn as baselines",
    ),
) -> None:
    """Write RUN_DIR/report.html: one self-contained page of the run's figures, devices, failures and config.

    Exit codes: 0 written, 2 config (RUN_DIR or --benchmark missing), 4 RUN_DIR holds no run.
    """
    from msfusion.coordinator.fleet.run_report import write_report

    with cli_errors():
        path = write_report(run_dir, benchmark)
    console.print(Text(str(path)), soft_wrap=True)


def main() -> None:
    """Console-script entry point (`msfusion`)."""
    app()


if __name__ == "__main__":
    main()
