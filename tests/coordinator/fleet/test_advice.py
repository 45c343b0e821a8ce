"""`msfusion plan`: the advice follows the measured figures, nearest point first."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from msfusion.coordinator.cli.main import app
from msfusion.coordinator.fleet.advice import Measured, advise, case_of, load_measured, to_json
from msfusion.errors import ConfigError
from msfusion.models.config import ModelConfig

CNN = case_of(ModelConfig("cnn"))  # the plan command's default model


def _point(devices: int, budget: float, ours: float, small: float, sd: float = 0.01) -> Measured:
    return Measured(CNN, budget, devices, ours, sd, "heterofl-prefix", small, sd, 0.9, 3, 30)


POINTS = [_point(8, 1 / 16, 0.60, 0.70), _point(128, 1 / 16, 0.80, 0.70), _point(32, 1 / 4, 0.705, 0.70)]


def test_msfusion_is_advised_only_where_it_won_beyond_the_spread() -> None:
    assert advise(8, 1 / 16, 0.25, POINTS).strategy == "heterofl-prefix"
    won = advise(100, 1 / 16, 0.25, POINTS)  # nearest fleet size on a log scale: 128
    assert won.strategy == "msfusion" and won.basis == POINTS[1]
    assert "beat" in won.reason and "10.0 points" in won.reason
    # A lead inside the seeds' spread is no win.
    tie = advise(32, 1 / 4, 0.5, POINTS)
    assert tie.strategy == "heterofl-prefix" and "did not beat" in tie.reason


def test_another_models_figures_are_not_advice() -> None:
    lm = case_of(ModelConfig("charlm"))
    advice = advise(128, 1 / 16, 0.25, POINTS, lm)
    assert advice.strategy == "fedavg-small" and advice.basis is None and lm in advice.reason
    assert advise(128, 1 / 16, 0.25, POINTS, CNN).strategy == "msfusion"


def test_a_fleet_too_small_to_cover_a_group_gets_the_small_model() -> None:
    advice = advise(3, 1 / 16, 0.25, POINTS)
    assert advice.strategy == "fedavg-small" and advice.basis is None
    with pytest.raises(ConfigError):
        advise(0, 1 / 16, 0.25, POINTS)


def test_the_shipped_figures_load_and_round_trip(tmp_path: Path) -> None:
    shipped = load_measured()
    assert shipped and all(0 < m.budget <= 1 and m.devices >= 1 for m in shipped)
    path = tmp_path / "m.json"
    path.write_text(to_json(POINTS, {}))
    assert load_measured(path) == POINTS
    path.write_text('{"points": [{"case": 1}]}')
    with pytest.raises(ConfigError, match="malformed"):
        load_measured(path)


def test_the_plan_command_prints_the_cost_and_the_advice(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(to_json(POINTS, {}))
    result = CliRunner().invoke(app, ["plan", "--devices", "128", "--budget", "1/16", "--measured", str(path)])
    assert result.exit_code == 0, result.output
    assert "recommended: msfusion" in result.output and "parameters per device" in result.output
    for budget in ("x", "1/0"):
        bad = CliRunner().invoke(app, ["plan", "--devices", "8", "--budget", budget])
        assert bad.exit_code == 2 and "error" in bad.output and "Traceback" not in bad.output
