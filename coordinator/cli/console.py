"""Terminal output with rich: live round progress, per-device state, accuracy, and the final summary block.

Every piece of text that comes from a user, a device or an error (ids, paths, reasons,
replies) is drawn as `rich.text.Text`, never parsed as markup: a `[table]` or a
`[/path]` in it prints as it is.
"""

from __future__ import annotations

from typing import Mapping

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from msfusion.coordinator.fleet.report import RunSummary
from msfusion.coordinator.fleet.rounds import RoundOutcome

_STATE_STYLE = {"idle": "dim", "training": "yellow", "uploading": "cyan", "offline": "red"}


class RichProgress:
    """A `RunProgress` that redraws a live table: rounds done, devices, accuracy.

    `step` is a `msfusion.progress.ProgressCallback`: a bar for each artifact export and
    validation while it runs, drawn inside the same live view (one live display per console).
    """

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.rounds = rounds
        self.history: list[RoundOutcome] = []
        self.status = "waiting for devices"
        self.devices: Mapping[str, str] = {}
        self.replies: Mapping[str, str] = {}
        self.steps = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TimeElapsedColumn(),
            console=self.console,
            auto_refresh=False,  # drawn by the live view below
        )
        self._steps: dict[str, TaskID] = {}
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> RichProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._render())
        self.live.__exit__(None, None, None)

    def step(self, label: str, done: int, total: int) -> None:
        """One export or validation step of an artifact (shown while it runs)."""
        if label not in self._steps:
            self._steps[label] = self.steps.add_task(label, total=total)
        self.steps.update(self._steps[label], completed=done, total=total)
        if done >= total:
            self.steps.remove_task(self._steps.pop(label))
        self.live.update(self._render())

    def waiting(self, registered: int, needed: int) -> None:
        self.status = f"waiting for devices: {registered} of {needed} online"
        self.live.update(self._render())

    def tick(self, round_idx: int, devices: Mapping[str, str], replies: Mapping[str, str]) -> None:
        self.status = f"round {round_idx + 1} of {self.rounds}: {len(replies)} replies"
        self.devices, self.replies = devices, replies
        self.live.update(self._render())

    def round_done(self, outcome: RoundOutcome) -> None:
        self.history.append(outcome)
        self.replies = outcome.replies
        self.live.update(self._render())

    def _render(self) -> Group:
        rounds = Table(title="rounds", expand=False)
        for column in ("round", "try", "merged", "accuracy", "overlap", "wall s"):
            rounds.add_column(column, justify="right")
        for o in self.history[-12:]:
            merged = sum(1 for r in o.replies.values() if r == "merged")
            accuracy = f"{o.metrics['accuracy']:.4f}" if "accuracy" in o.metrics else "-"
            wall = sum(o.timings_s.values())
            rounds.add_row(
                str(o.round_idx + 1),
                str(o.attempt),
                f"{merged}/{len(o.devices)}",
                accuracy,
                f"{o.overlap:.3f}",
                f"{wall:.1f}",
            )
        devices = Table(title="devices")
        devices.add_column("device")
        devices.add_column("state")
        devices.add_column("this round")
        for device_id, state in sorted(self.devices.items()):
            style = _STATE_STYLE.get(state, "")
            devices.add_row(Text(device_id), Text(state, style=style), Text(self.replies.get(device_id, "")[:60]))
        if self._steps:
            return Group(Text(self.status), self.steps, rounds, devices)
        return Group(Text(self.status), rounds, devices)


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    """The final block: success or failure, figures, failed devices and why, where the outputs are."""
    console = console or Console()
    lines: list[Text | str] = [
        Text.assemble(
            ("SUCCESS" if summary.ok else "FAILURE", f"bold {'green' if summary.ok else 'red'}"),
            f": {summary.reason}" if summary.reason else "",
        )
    ]
    lines.append(f"strategy {summary.strategy}, {summary.rounds} rounds merged")
    if summary.final_metrics:
        lines.append("final: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.final_metrics.items()))
    if summary.variant_metrics:
        figures = []
        for name, scored in summary.variant_metrics.items():
            test = scored.get("test", {})
            val = scored.get("validation", {})
            metric = "perplexity" if "perplexity" in test else "accuracy"
            text = f"{name} test {metric} {test.get(metric, float('nan')):.4f}"
            if val:
                text += f" (validation {val.get(metric, float('nan')):.4f})"
            figures.append(text)
        lines.append(f"model.safetensors is the {summary.deployable} model; " + "; ".join(figures))
    held = [d["params"] for d in summary.devices.values() if "params" in d]
    if summary.model_params and held:
        lines.append(
            f"global model {summary.model_params:,} parameters; each device held and trained "
            f"{min(held):,}-{max(held):,} of them ({min(held) / summary.model_params:.1%}-"
            f"{max(held) / summary.model_params:.1%}) per round"
        )
    rounds = Table(box=None, title="accuracy by round")
    for column in ("round", "accuracy", "loss", "overlap", "merged"):
        rounds.add_column(column, justify="right")
    for entry in summary.history:
        m = entry["metrics"]
        rounds.add_row(
            str(entry["round"] + 1),
            f"{m.get('accuracy', float('nan')):.4f}",
            f"{m.get('loss', float('nan')):.4f}",
            f"{entry['overlap']:.3f}",
            f"{entry['merged']}/{entry['devices']}",
        )
    table = Table(box=None, title="devices")
    for column in ("device", "width", "share", "merged", "failed", "MB down", "MB up", "peak RSS MB"):
        table.add_column(column, justify="right")
    for device_id, d in sorted(summary.devices.items()):
        share = d["params"] / summary.model_params if summary.model_params and "params" in d else float("nan")
        table.add_row(
            device_id,
            f"{d.get('width_ratio', float('nan')):.3f}",
            f"{share:.1%}",
            str(d["merged"]),
            str(d["failed"]),
            f"{d['bytes_down'] / 1e6:.2f}",
            f"{d['bytes_up'] / 1e6:.2f}",
            f"{d['peak_rss_bytes'] / 1e6:.0f}",
        )
    failures = [f"  {f}" for f in summary.failures[-10:]]
    if failures:
        failures.insert(0, f"failed replies and refused devices ({len(summary.failures)}, last 10):")
    paths = [f"{name}: {path}" for name, path in summary.paths.items()]
    head = Text("\n").join(line if isinstance(line, Text) else Text(line) for line in lines)
    console.print(Panel(Group(head, rounds, table, Text("\n".join(failures + paths))), title="msfusion run"))
