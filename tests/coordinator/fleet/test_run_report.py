"""The run report: one self-contained HTML page per run folder, finished or crashed, and `msfusion report`."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from browser import chromium, screenshot
from typer.testing import CliRunner

from msfusion.coordinator.cli.main import ExitCode, app
from msfusion.coordinator.fleet import report
from msfusion.coordinator.fleet.config import CoordinatorConfig
from msfusion.coordinator.fleet.rounds import RoundOutcome
from msfusion.coordinator.fleet.run_report import (
    CHART_FILES,
    CONFIG_FILE,
    REPORT_DIR,
    REPORT_FILE,
    baselines,
    report_title,
    write_report,
)
from msfusion.errors import ConfigError, DataError
from msfusion.models.config import ModelConfig
from msfusion.recipe import EngineConfig

REPO = Path(__file__).resolve().parents[3]
DEVICES = ("dev000", "dev001", "dev002", "dev003")
EVIL = "<script>alert('boom')</script> & more"
MiB = 2**20


def outcome(round_idx: int, attempt: int = 0, replies: dict[str, str] | None = None) -> RoundOutcome:
    """One round attempt over DEVICES; every device merged unless `replies` says otherwise."""
    replies = {d: "merged" for d in DEVICES} | (replies or {})
    answered = [d for d, r in replies.items() if r == "merged"]
    merged = len(answered) >= 3
    return RoundOutcome(
        round_idx=round_idx,
        attempt=attempt,
        merged=merged,
        overlap=0.8,
        devices=DEVICES,
        replies=replies,
        metrics={"accuracy": 0.3 + 0.1 * round_idx, "loss": 2.0 - 0.3 * round_idx} if merged else {},
        timings_s={"collect_s": 1.5},
        bytes_down={d: 2_000_000 + 10_000 * i for i, d in enumerate(DEVICES)},
        bytes_up={d: 1_000_000 for d in answered},
        slice_bytes={d: 1_900_000 for d in DEVICES},
        peak_rss_bytes={d: (300 + 100 * i) * MiB for i, d in enumerate(DEVICES) if d in answered},
        budget_bytes={d: 512 * MiB for d in DEVICES},
        step_time_s={d: 0.02 * (i + 1) for i, d in enumerate(DEVICES) if d in answered},
        width_ratios={d: 0.25 if d != "dev003" else 0.125 for d in DEVICES},
    )


def write_lines(run_dir: Path, outcomes: list[RoundOutcome]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / report.METRICS_FILE, "a", encoding="utf-8") as handle:
        for i, o in enumerate(outcomes):
            handle.write(json.dumps({**asdict(o), "wall_s": 3.0 + i}) + "\n")


def finished_run(run_dir: Path) -> Path:
    """A run of 3 rounds: round 2 needed a second attempt (dev003's reply carries markup), then a summary."""
    write_lines(
        run_dir,
        [
            outcome(0),
            outcome(1, 0, {"dev001": f"failed: memory_budget: {EVIL}", "dev002": "no reply"}),
            outcome(1, 1, {"dev003": "rejected: non-finite weights"}),
            outcome(2),
        ],
    )
    lines = report.read_metrics(run_dir)
    report.write_summary(
        run_dir,
        report.RunSummary(
            ok=True,
            reason="",
            strategy="msfusion",
            rounds=3,
            final_metrics=lines[-1]["metrics"],
            history=report.history(lines),
            devices=report.device_totals(lines),
            failures=report.failures(lines),
            excluded={"dev009": "its data are text, the model takes images"},
        ),
    )
    (run_dir / "run.toml").write_text(
        'run_id = "fmnist"\nbroker = "mqtt://10.0.0.1:1883"\npassword = "hunter2"\n\n[engine]\nrounds = 3\n',
        encoding="utf-8",
    )
    return run_dir


def scaling_benchmark(path: Path) -> Path:
    """Rows in bench/results/scaling.json's format: strategy, test figures per variant, curve."""

    def row(strategy: str, devices: int, accuracy: float) -> dict[str, object]:
        test = {"merged": {"accuracy": accuracy - 0.05}, "expected": {"accuracy": accuracy}}
        return {
            "devices": devices,
            "budget": "1/16",
            "strategy": strategy,
            "deployable": "expected",
            "test": test,
            "curve": [0.1, accuracy - 0.05],
        }

    rows = [row("msfusion", 4, 0.6), row("fedavg-full", 4, 0.7), row("fedavg-full", 4, 0.8), row("heterofl", 4, 0.5)]
    rows.append(row("heterofl", 32, 0.1))  # another fleet size: not drawn
    path.write_text(json.dumps({"meta": {"rounds": 3}, "runs": rows}), encoding="utf-8")
    return path


def images(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_report_is_self_contained_and_complete(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    path = write_report(run_dir, scaling_benchmark(tmp_path / "scaling.json"))
    assert path == run_dir / REPORT_FILE
    page = path.read_text(encoding="utf-8")

    assert f"<title>{report_title(run_dir)}</title>" in page
    # Self-contained: every image is a data URI of the PNG written next to it; nothing is loaded from elsewhere.
    sources = images(page)
    assert len(sources) == len(CHART_FILES)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    for name in CHART_FILES:
        png = (run_dir / REPORT_DIR / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in sources
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page

    for device in (*DEVICES, "dev009"):
        assert f"<td>{device}</td>" in page
    # The failures table, escaped: the markup in a reason is shown, never run.
    assert "&lt;script&gt;alert(&#x27;boom&#x27;)&lt;/script&gt; &amp; more" in page
    assert "no reply" in page and "rejected: non-finite weights" in page
    assert "excluded: its data are text, the model takes images" in page
    # Baselines: the other strategies, of this fleet size (the run's own strategy is its curve).
    metric = page.split('<section id="metric">')[1].split("</section>")[0]
    assert '<td>fedavg-full</td><td class="num">0.75</td><td class="num">2</td>' in metric
    assert '<td>heterofl</td><td class="num">0.5</td><td class="num">1</td>' in metric
    assert "<td>msfusion</td>" not in metric and "this run is msfusion" in metric
    # The config: the run file as given (password redacted) and summary.json's fields.
    assert "run file run.toml" in page and "mqtt://10.0.0.1:1883" in page
    assert "hunter2" not in page
    assert "summary.json" in page and "<td>strategy</td><td>msfusion</td>" in page
    assert "finished" in page


def test_crashed_run_gets_a_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "crashed"
    write_lines(run_dir, [outcome(0), outcome(1, 0, {"dev000": "no reply", "dev001": "no reply"})])
    with open(run_dir / report.METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write('{"round_idx": 2, "attem')  # killed mid-write
    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "did not finish: no summary.json" in page
    assert "1 unreadable line(s) of metrics.jsonl skipped" in page
    assert "1 of 2 round attempts" in page
    assert all(f"<td>{device}</td>" in page for device in DEVICES)
    assert len(images(page)) == len(CHART_FILES)


def test_run_without_rounds_says_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / report.METRICS_FILE).write_text("", encoding="utf-8")
    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "metrics.jsonl has no rounds: the run ended before its first round did" in page
    assert "no merged round: nothing to plot" in page
    assert images(page) == []
    assert not any((run_dir / REPORT_DIR / name).exists() for name in CHART_FILES)


def test_reference_engine_lines_and_a_language_model(tmp_path: Path) -> None:
    """`msfusion train` writes only round, metrics, overlap and wall_s; a char-LM is judged on perplexity."""
    run_dir = tmp_path / "train"
    run_dir.mkdir()
    lines = [
        {"round_idx": r, "metrics": {"perplexity": 20.0 - r, "loss": 3.0}, "overlap": 0.9, "wall_s": 1.0}
        for r in range(3)
    ]
    (run_dir / report.METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    page = write_report(run_dir).read_text(encoding="utf-8")

    assert "test perplexity by round" in page
    assert "no device took part in a round" in page
    assert len(images(page)) == 1


def test_unknown_benchmark_format_is_ignored_with_a_note(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": [1, 2, 3]}), encoding="utf-8")
    page = write_report(run_dir, odd).read_text(encoding="utf-8")
    assert "benchmark odd.json: no rows with a strategy and a final test accuracy" in page
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    page = write_report(run_dir, broken).read_text(encoding="utf-8")
    assert "benchmark broken.json: broken.json could not be read" in page
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(run_dir, tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["scaling.json", "full-cnn.json"])
def test_shipped_benchmarks_give_baselines(name: str) -> None:
    data = json.loads((REPO / "bench" / "results" / name).read_text(encoding="utf-8"))
    drawn, notes = baselines(data, "accuracy", 8, "msfusion")
    assert len(drawn) >= 2, notes
    assert "msfusion" not in {b.label for b in drawn}
    assert all(0 < b.value <= 1 and b.rows >= 1 for b in drawn)


def test_full_benchmark_rows_by_budget() -> None:
    rows = [
        {"strategy": "fedrolex", "budget": "1/4", "metric": "accuracy", "final": 0.6},
        {"strategy": "fedrolex", "budget": "1/16", "metric": "accuracy", "final": 0.4},
        {"strategy": "fedrolex", "budget": "1/16", "metric": "perplexity", "final": 12.0},
        {"no": "strategy"},
    ]
    drawn, _ = baselines({"results": rows}, "accuracy")
    assert [(b.label, b.value) for b in drawn] == [("fedrolex (1/16)", 0.4), ("fedrolex (1/4)", 0.6)]
    assert [(b.label, b.value) for b in baselines({"results": rows}, "perplexity")[0]] == [("fedrolex", 12.0)]


def test_config_is_kept_without_its_secrets(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    config = CoordinatorConfig(engine=EngineConfig(model=ModelConfig(arch="cnn")), run_id="fmnist", password="s3cret")
    write_report(run_dir, config=config)
    kept = json.loads((run_dir / REPORT_DIR / CONFIG_FILE).read_text(encoding="utf-8"))
    assert kept["password"] == "***" and kept["engine"]["plan"]["strategy"] == "msfusion"
    page = write_report(run_dir).read_text(encoding="utf-8")  # a later report shows the kept config
    assert "s3cret" not in page and "&quot;arch&quot;: &quot;cnn&quot;" in page


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a run folder"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        write_report(tmp_path / "nowhere")


def test_cli_report(tmp_path: Path) -> None:
    runner = CliRunner()
    run_dir = finished_run(tmp_path / "run")
    result = runner.invoke(app, ["report", str(run_dir), "--benchmark", str(scaling_benchmark(tmp_path / "s.json"))])
    assert result.exit_code == ExitCode.SUCCESS, result.output
    assert str(run_dir / REPORT_FILE) in result.output
    assert (run_dir / REPORT_FILE).is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, code in ((empty, ExitCode.DATA_ERROR), (tmp_path / "nowhere", ExitCode.CONFIG_ERROR)):
        result = runner.invoke(app, ["report", str(folder)])
        assert result.exit_code == code, result.output
        assert "error:" in result.output and "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit)
    assert "not a run folder" in runner.invoke(app, ["report", str(empty)]).output


def test_report_in_a_real_browser(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    path = write_report(run_dir, scaling_benchmark(tmp_path / "scaling.json"))
    shot = tmp_path / "report-screenshot.png"
    with chromium() as driver:
        driver.get(path.resolve().as_uri())
        assert driver.title == report_title(run_dir)
        loaded = driver.execute_script("return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert loaded == [True] * len(CHART_FILES)
        rows = driver.execute_script("return document.querySelectorAll('#failures tbody tr').length")
        assert rows == 4  # dev001, dev002, dev003 and the excluded dev009
        screenshot(driver, shot)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
