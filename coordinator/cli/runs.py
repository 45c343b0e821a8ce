"""`msfusion runs ...`: list, inspect, follow and stop coordinator runs, from their event streams (`fleet/events.py`).

A run is a folder holding `events.jsonl` (every `coordinator run` and
`simulate` writes one); RUN is that folder, or its name under `--root`.

Exit codes: 0 success; 2 RUN is not a run folder; 1 `stop` on a run that is
not running, or that did not stop within `--timeout-s`. A run stopped by
`runs stop` exits 130 itself and continues with `coordinator run --resume`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from msfusion.coordinator.cli.common import ExitCode, cli_errors, console
from msfusion.coordinator.fleet.events import EVENTS_FILE, STOP_FILE, fold, read_events, run_state
from msfusion.errors import ConfigError

runs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and stop runs.")
ROOT = Path("runs")


def find_run(run: str, root: Path) -> Path:
    """The run folder RUN names (a path, or a name under `root`).

    Raises:
        ConfigError: neither holds an event stream.
    """
    for candidate in (Path(run), root / run):
        if (candidate / EVENTS_FILE).is_file():
            return candidate
    raise ConfigError(f"{run!r} is not a run folder (no {EVENTS_FILE} in {run} or {root / run})")


def _metric(figures: dict[str, Any]) -> str:
    for key in ("accuracy", "perplexity"):
        if key in figures:
            return f"{key} {figures[key]:.4f}"
    return ""


@runs_app.command("list")
def runs_list(root: Path = typer.Option(ROOT, "--root", help="the folder holding run folders")) -> None:
    """Every run under ROOT: id, strategy, model, rounds done, final metric, state. Exit codes: 0."""
    table = Table("run", "strategy", "model", "rounds", "final", "state", "folder")
    folders = sorted(p.parent for p in root.glob(f"*/{EVENTS_FILE}")) if root.is_dir() else []
    for folder in folders:
        events = read_events(folder)
        run = fold(events)["run"]
        table.add_row(
            Text(str(run.get("run_id", folder.name))),
            Text(str(run.get("strategy", ""))),
            Text(str(run.get("model", ""))),
            f"{run.get('rounds_done', 0)}/{run.get('rounds', '?')}",
            _metric(run.get("final_metrics") or {}),
            run_state(folder, events),
            Text(str(folder)),
        )
    console.print(table if folders else Text(f"no runs under {root}"))


@runs_app.command("show")
def runs_show(
    run: str = typer.Argument(..., help="the run folder, or its name under --root"),
    root: Path = typer.Option(ROOT, "--root"),
    as_json: bool = typer.Option(False, "--json", help="the run's picture as JSON (what /api/runs/{id} serves)"),
) -> None:
    """One run: state, rounds with their timings, devices, failures. Exit codes: 0, 2 not a run folder."""
    with cli_errors():
        folder = find_run(run, root)
    events = read_events(folder)
    picture = fold(events)
    picture["run"]["state"] = run_state(folder, events)
    if as_json:
        typer.echo(json.dumps(picture, indent=1, default=str))
        return
    console.print(_view(picture, folder))


def _view(picture: dict[str, Any], folder: Path) -> Table:
    run = picture["run"]
    outer = Table.grid(padding=(0, 1))
    outer.add_row(
        Text(
            f"{run.get('run_id', folder.name)}: {run.get('state')} · {run.get('strategy', '')} · "
            f"{run.get('model', '')} · round {run.get('rounds_done', 0)}/{run.get('rounds', '?')} · "
            f"{_metric(run.get('final_metrics') or {})}",
            style="bold",
        )
    )
    if run.get("reason"):
        outer.add_row(Text(f"reason: {run['reason']}"))
    rounds = Table("round", "try", "merged", "replies", "wall s", "metric", title="rounds")
    for r in picture["rounds"][-15:]:
        replies = r.get("replies") or {}
        merged = sum(v == "merged" for v in replies.values())
        rounds.add_row(
            str(r["round_idx"] + 1),
            str(r["attempt"] + 1),
            "yes" if r["merged"] else "no",
            f"{merged}/{len(replies)}",
            f"{r.get('wall_s') or 0:.1f}",
            _metric(r.get("metrics") or {}),
        )
    devices = Table(
        "device", "state", "width", "peak MB", "down MB", "up MB", "failures", "last failure", title="devices"
    )
    for d, x in picture["devices"].items():
        devices.add_row(
            Text(d),
            Text(str(x.get("state", ""))),
            f"{x['width']:.3f}" if isinstance(x.get("width"), float) else "",
            f"{x['peak_rss_bytes'] / 2**20:.0f}" if x.get("peak_rss_bytes") else "",
            f"{x.get('bytes_down_total', 0) / 2**20:.2f}",
            f"{x.get('bytes_up_total', 0) / 2**20:.2f}",
            str(x.get("failures", 0)),
            Text(str(x.get("last_failure", ""))),
        )
    outer.add_row(rounds)
    outer.add_row(devices)
    for device, why in picture.get("excluded", {}).items():
        outer.add_row(Text(f"left out: {device}: {why}"))
    return outer


@runs_app.command("follow")
def runs_follow(
    run: str = typer.Argument(..., help="the run folder, or its name under --root"),
    root: Path = typer.Option(ROOT, "--root"),
    interval_s: float = typer.Option(0.5, "--interval-s"),
) -> None:
    """Tail a run's events with a live view until it ends (like `tail -f`). Exit codes: 0, 2 not a run folder."""
    with cli_errors():
        folder = find_run(run, root)
    with Live(console=console, auto_refresh=False) as live:
        while True:
            events = read_events(folder)
            picture = fold(events)
            state = run_state(folder, events)
            picture["run"]["state"] = state
            live.update(_view(picture, folder), refresh=True)
            if state not in ("running", "starting"):
                return
            time.sleep(interval_s)


@runs_app.command("stop")
def runs_stop(
    run: str = typer.Argument(..., help="the run folder, or its name under --root"),
    root: Path = typer.Option(ROOT, "--root"),
    reason: str = typer.Option("stopped from the command line", "--reason"),
    timeout_s: float = typer.Option(600.0, "--timeout-s", help="how long to wait for the run to stop (0: do not)"),
) -> None:
    """Stop a run cleanly after its current round: devices are told, the checkpoint stays resumable.

    Exit codes: 0 stopped (or asked to, with --timeout-s 0); 1 not running, or still running at the timeout;
    2 not a run folder. The stopped run exits 130; `coordinator run --resume` continues it.
    """
    with cli_errors():
        folder = find_run(run, root)
    if run_state(folder) != "running":
        console.print(Text(f"{folder} is not running ({run_state(folder)})"))
        raise typer.Exit(ExitCode.RUN_FAILED)
    (folder / STOP_FILE).write_text(reason + "\n", encoding="utf-8")
    console.print(Text(f"asked {folder} to stop after its current round"))
    deadline = time.monotonic() + timeout_s
    while timeout_s > 0 and run_state(folder) == "running":
        if time.monotonic() > deadline:
            console.print(Text(f"{folder} is still running after {timeout_s:.0f} s"))
            raise typer.Exit(ExitCode.RUN_FAILED)
        time.sleep(0.5)
    if timeout_s > 0:
        console.print(Text(f"{folder}: {run_state(folder)}"))
