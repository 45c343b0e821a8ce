"""What an operator sees when something is wrong: one-line errors with named exit codes, documented.

One test per finding of the "Operators' view" review: bad --backend and
--channels values, rich markup eating `[engine]` and choking on `[/path]`,
refused devices making a run wait out its whole `wait_s`, `--rounds 0`
reported as a success, exit codes missing from `--help` and the README; and
the progress callbacks the CLI draws its bars from.
"""

from __future__ import annotations

import io
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from msfusion.coordinator.cli.common import cli_errors, progress_bars, sigterm_as_interrupt
from msfusion.coordinator.cli.console import RichProgress, print_summary
from msfusion.coordinator.cli.main import ExitCode, app
from msfusion.coordinator.fleet.report import RunSummary
from msfusion.errors import ConfigError
from msfusion.models.config import ContrastiveVariant, LossConfig, ModelConfig
from msfusion.recipe import EngineConfig, LocalTrainConfig

runner = CliRunner()
README = Path(__file__).resolve().parents[3] / "README.md"
TINY = EngineConfig(
    model=ModelConfig(arch="cnn", channels=(4, 8)),
    local=LocalTrainConfig(batch_size=4),
    loss=LossConfig(ContrastiveVariant.OFF),
    rounds=1,
)


def _lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--backend", "tflite"], "--backend must be one of ort, executorch, torch, got 'tflite'"),
        (["simulate", "--channels", "a,b"], "--channels must be comma-separated positive integers"),
        (["simulate", "--engine", "k8s"], "--engine must be one of process, ray, got 'k8s'"),
        (["train", "--channels", "8,0,16"], "--channels must be comma-separated positive integers"),
        (["plan", "--devices", "4", "--budget", "1/4", "--channels", "a,b"], "got 'a,b'"),
    ],
)
def test_1_a_bad_backend_or_channels_is_one_line_and_a_config_error_before_any_work(
    args: list[str], message: str, tmp_path: Path
) -> None:
    # Execute
    out = [] if args[0] == "plan" else ["--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, *out])
    # Assert: one line, no traceback, exit 2; and nothing was partitioned first.
    assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
    lines = _lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_2_brackets_in_errors_and_summaries_print_as_they_are(tmp_path: Path) -> None:
    # A run file in a folder whose path holds `[engine]` and `[/tmp/x]` (rich would read both as markup).
    folder = tmp_path / "[engine]" / "[" / "tmp" / "x]"
    missing = runner.invoke(app, ["coordinator", "run", "--config", str(folder / "run.toml")])
    assert missing.exit_code == ExitCode.CONFIG_ERROR, missing.output
    assert "[engine]" in missing.output and "[/tmp/x]" in missing.output and len(_lines(missing.output)) == 1
    # A run file without its [engine.model] table: the table's name survives.
    folder.mkdir(parents=True)
    (folder / "run.toml").write_text('run_id = "x"\n', encoding="utf-8")
    result = runner.invoke(app, ["coordinator", "run", "--config", str(folder / "run.toml")])
    assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
    assert "the run file needs an [engine.model] table" in result.output
    # The run's summary and live view draw reasons, replies and paths as text too.
    reason = str(ConfigError("the run file needs an [engine] table, see [/tmp/x]"))
    summary = RunSummary(
        ok=False,
        reason=reason,
        strategy="msfusion",
        rounds=0,
        final_metrics={},
        failures=["dev000: refused: [/tmp/x] is [bold]not[/] a budget"],
        paths={"logs": "/tmp/[x]/logs"},
    )
    screen = Console(file=io.StringIO(), width=300)
    print_summary(summary, screen)
    with RichProgress(1, Console(file=io.StringIO(), width=300)) as live:
        live.tick(0, {"dev000": "training"}, {"dev000": "failed: [/tmp/x] [engine]"})
        live.step("export ort artifact [/tmp/x]", 0, 1)
        live.step("export ort artifact [/tmp/x]", 1, 1)
    text = screen.file.getvalue()  # type: ignore[attr-defined]
    assert reason in text and "[/tmp/x] is [bold]not[/] a budget" in text and "/tmp/[x]/logs" in text
    assert "failed: [/tmp/x] [engine]" in live.console.file.getvalue()  # type: ignore[attr-defined]


def test_3_refused_devices_fail_the_wait_at_once_with_their_reasons(mosquitto: Any, tmp_path: Path) -> None:
    # Prepare: a real coordinator link on a real broker; devices register as the daemon does.
    from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
    from msfusion.coordinator.fleet.config import CoordinatorConfig, RoundConfig
    from msfusion.coordinator.fleet.link import CoordinatorLink
    from msfusion.coordinator.fleet.registry import Fleet
    from msfusion.coordinator.fleet.rounds import RoundContext
    from msfusion.coordinator.fleet.runner import NotEnoughDevices, finish, wait_for_devices
    from msfusion.data.datasets import ArrayDataset
    from msfusion.models.registry import build_model, model_spec, state_to_numpy
    from msfusion.wire import topics
    from msfusion.wire.protocol import Capacity, ChannelStats, DataReport, Registration, encode
    from msfusion.wire.transport import MqttTransport

    run = "refusals"
    spec = model_spec(TINY.model)
    fleet = Fleet(spec, run, "ort", 30.0, inputs=TINY.model.inputs())
    coordinator = MqttTransport("coordinator-refusals", mosquitto.host, mosquitto.port)
    coordinator.connect()
    link = CoordinatorLink(coordinator, run, stall_s=2.0)
    link.subscribe()
    ctx = RoundContext(
        run_id=run,
        backend="ort",
        engine=TINY,
        round=RoundConfig(),
        spec=spec,
        fleet=fleet,
        link=link,
        artifacts=ExportedArtifacts(TINY, "ort", cache_dir=tmp_path / "cache"),
        test=ArrayDataset(np.zeros((0,)), np.zeros((0,))),
        checkpoint_dir=tmp_path / "checkpoint",
    )
    device = MqttTransport("device-refusals", mosquitto.host, mosquitto.port)
    device.connect()

    def register(device_id: str, budget_mb: int, backends: list[str], data: DataReport | None = None) -> None:
        capacity = Capacity(memory_budget_bytes=budget_mb << 20, cores=2, arch="x86_64", backends=backends)
        msg = Registration(run_id=run, device_id=device_id, capacity=capacity, runtime_version="0.1.0", data=data)
        device.publish(topics.register(run, device_id), encode(msg))

    try:
        register("dev000", 100, ["ort"])  # `simulate --budget-mb 100`: less than the runtime itself
        register("dev001", 1024, ["executorch"])
        register("dev002", 1024, ["ort"])
        # Execute: three expected, all three answer, one is admitted.
        started = time.monotonic()
        with pytest.raises(NotEnoughDevices) as caught:
            wait_for_devices(ctx, 3, 120.0, None)
        waited = time.monotonic() - started
        refused = dict(fleet.refused)
        # The refused come back: dev000 with a budget that fits, dev001 with data the model cannot take.
        bad_data = DataReport(
            format="images",
            task="classification",
            n_samples=10,
            sample_shape=[3, 32, 32],
            channel_stats=ChannelStats(count=30720, mean=[0.3] * 3, m2=[700.0] * 3),
            class_counts={"0": 4, "1": 6},
        )
        register("dev000", 1024, ["ort"])
        register("dev001", 1024, ["ort"], data=bad_data)
        wait_for_devices(ctx, 3, 60.0, None)  # two live and one left out for its data: enough
    finally:
        device.close()
        coordinator.close()
    # Assert: no waiting out the 120 s, and the reasons are in the error.
    assert waited < 20, waited
    message = str(caught.value)
    assert message.startswith("1 of 3 devices online and every expected device has answered; 2 refused")
    assert "dev000: a budget of 104857600 bytes leaves nothing after the runtime" in message
    assert "dev001: run needs backend 'ort', device has ['executorch']" in message
    assert set(refused) == {"dev000", "dev001"}
    # An accepted registration clears a refusal; one left out for its data stays refused but tolerated.
    assert set(fleet.refused) == set(fleet.excluded) == {"dev001"}
    assert [slot.device_id for slot in fleet.participants(time.monotonic())] == ["dev000", "dev002"]
    # The run's summary lists a refusal among its failures (one left out for its data under `excluded`).
    config = CoordinatorConfig(engine=TINY, run_id=run, out=tmp_path / "out")
    config.out.mkdir()
    weights = state_to_numpy(build_model(TINY.model, seed=0))
    # As at the end of a run in which dev000 stayed refused and dev001 was left out for its data:
    refusals = {"dev000": refused["dev000"], **fleet.refused}
    summary = finish(config, weights, False, message, excluded=fleet.excluded, refused=refusals)
    assert summary.failures[-1].startswith("dev000: refused: a budget of 104857600 bytes leaves nothing")
    assert not any(f.startswith("dev001") for f in summary.failures) and set(summary.excluded) == {"dev001"}


def test_4_zero_rounds_is_a_config_error_everywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        EngineConfig(model=TINY.model, rounds=0)
    for command in (["simulate"], ["train"]):
        result = runner.invoke(app, [*command, "--rounds", "0", "--out", str(tmp_path / command[0])])
        assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
        assert _lines(result.output) == ["error: --rounds must be >= 1, got 0"]
        assert not (tmp_path / command[0]).exists()
    run_file = tmp_path / "run.toml"
    run_file.write_text('[engine.model]\narch = "cnn"\n', encoding="utf-8")
    for args in (["--rounds", "0"], []):
        if not args:
            run_file.write_text('[engine]\nrounds = 0\n[engine.model]\narch = "cnn"\n', encoding="utf-8")
        result = runner.invoke(app, ["coordinator", "run", "--config", str(run_file), *args])
        assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
        assert "rounds must be >= 1" in result.output and len(_lines(result.output)) == 1


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf command under a (typer's own click) group, as its path of names."""
    found = []
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


def test_5_every_command_documents_its_exit_codes_in_help_and_readme(capsys: pytest.CaptureFixture[str]) -> None:
    from msfusion.edge_runtime.__main__ import main as device_main

    commands = _commands(typer.main.get_group(app))
    assert ("coordinator", "run") in commands and ("devices", "profile-set") in commands
    section = README.read_text(encoding="utf-8").split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    for path in [(), *commands]:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Exit codes:" in re.sub(r"\s+", " ", result.output), path
        if path:
            assert f" {path[-1]}`" in section or f"`{path[-1]}`" in section, path
    for argv in (["--help"], ["profile", "--help"]):
        with pytest.raises(SystemExit) as done:
            device_main(argv)
        assert done.value.code == 0
        assert "Exit codes" in re.sub(r"\s+", " ", capsys.readouterr().out), argv
    assert "`msfusion-device`" in section and "`msfusion-device profile`" in section


def test_6_the_profile_set_reports_each_export_and_validation_to_the_progress_callback(tmp_path: Path) -> None:
    from msfusion.coordinator.fleet.artifacts import export_profile_set

    # Prepare
    calls: list[tuple[str, int, int]] = []
    # Execute: a real (tiny) export and validation.
    export_profile_set(
        TINY, "ort", [1.0], [4], tmp_path / "set", cache_dir=tmp_path / "cache", progress=lambda *a: calls.append(a)
    )
    # Assert: the set as a whole, then the export and the validation as one step each.
    overall = f"profile set {tmp_path / 'set'}"
    assert calls[0] == (overall, 0, 1) and calls[-1] == (overall, 1, 1)
    steps = [c for c in calls if c[0] != overall]
    assert [(label.split()[0], done) for label, done, _ in steps] == [
        ("export", 0),
        ("export", 1),
        ("validate", 0),
        ("validate", 1),
    ]
    # The CLI's callback: a bar per label on a terminal, nothing in a pipe.
    terminal = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress_bars(terminal) as bars:
        for label, done, total in calls:
            bars(label, done, total)
    assert "validate ort artifact" in terminal.file.getvalue()  # type: ignore[attr-defined]
    pipe = Console(file=io.StringIO(), width=120)
    with progress_bars(pipe) as bars:
        bars("export ort artifact [/tmp/x]", 0, 1)
    assert pipe.file.getvalue() == ""  # type: ignore[attr-defined]


def test_sigterm_unwinds_a_command_as_ctrl_c_does_and_exits_130() -> None:
    # `msfusion simulate` runs under these two: a SIGTERM must run its clean-ups (tests/coordinator/fleet/
    # test_fleet_stop.py shows its daemons and broker stopped), not end the process where it stands.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # else the handler is left as it is
    cleaned = []
    with pytest.raises(typer.Exit) as exited:
        with cli_errors(), sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler raises in the main thread, out of the sleep
            finally:
                cleaned.append(True)
    assert exited.value.exit_code == ExitCode.INTERRUPTED and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # outside the block: the default again
