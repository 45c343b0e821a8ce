"""On-device profiling: profile sets, a real profile in fresh processes, the saved report, the command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np
import pytest

from msfusion.algorithm.spec import widths_for_ratio
from msfusion.data.shards import write_shard
from msfusion.edge_runtime.config import DeviceConfig, to_toml
from msfusion.edge_runtime.profiling import (
    PROFILE_FILE,
    PointResult,
    ProfileOptions,
    ProfileSet,
    ProfileSetPoint,
    format_table,
    load_profile,
    load_profile_set,
    load_profile_sets,
    profile_report,
    run_profile,
    save_profile,
    write_profile_set_index,
)
from msfusion.errors import ConfigError, ProtocolError
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch
from msfusion.models.registry import model_spec
from msfusion.wire.artifacts import ArtifactKind
from msfusion.wire.protocol import ProfileReport

RATIOS = (1.0, 0.5, 0.25)


@pytest.fixture(scope="module")
def profile_set(
    case: Any, exported: Callable[..., CachedArtifact], tmp_path_factory: pytest.TempPathFactory
) -> ProfileSet:
    """The case's CNN at three widths, batch 8, as a profile set."""
    root = tmp_path_factory.mktemp("profile-set")
    spec = model_spec(case.model)
    points = []
    for ratio in RATIOS:
        artifact = exported(ArtifactKind.ORT, widths=widths_for_ratio(spec, ratio))
        shutil.copytree(artifact.path, root / f"w{ratio}")
        points.append(ProfileSetPoint(ratio, case.batch, f"w{ratio}"))
    write_profile_set_index(root, "case-model", "ort", points)
    return load_profile_set(root)


def test_a_profile_set_selects_its_points_widest_first(profile_set: ProfileSet) -> None:
    assert [p.width_ratio for p in profile_set.select(None, None)] == [1.0, 0.5, 0.25]
    assert [p.width_ratio for p in profile_set.select([0.25, 1.0], [8])] == [1.0, 0.25]
    with pytest.raises(ConfigError, match=r"lacks \(width, batch\) \[\(0.125, 8\)\]"):
        profile_set.select([0.125, 1.0], [8])
    with pytest.raises(ConfigError, match=r"lacks \(width, batch\) \[\('any', 32\)\]"):
        profile_set.select(None, [32])
    with pytest.raises(ConfigError, match=r"\[\(0.75, 'any'\)\]"):
        profile_set.select([0.75, 0.5], None)


def test_a_malformed_profile_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a profile set"):
        load_profile_set(tmp_path)
    write_profile_set_index(tmp_path, "k", "ort", [ProfileSetPoint(0.5, 8, "missing")])
    with pytest.raises(ConfigError, match="'missing' is missing"):
        load_profile_set(tmp_path)
    write_profile_set_index(tmp_path, "k", "ort", [ProfileSetPoint(0.5, 8, "../escape")])
    with pytest.raises(ConfigError, match="invalid profile point"):
        load_profile_set(tmp_path)


def test_a_real_profile_measures_every_point_in_a_fresh_process(profile_set: ProfileSet) -> None:
    # Execute
    results = run_profile(profile_set, [0.25, 1.0], None, ProfileOptions(steps=2, warmup=1))
    # Assert: each point a whole process's peak (the runtime's baseline included), widest first
    assert [r.width_ratio for r in results] == [1.0, 0.25] and not any(r.error for r in results)
    for r in results:
        assert r.peak_rss_bytes >= max(r.hwm_bytes, r.baseline_rss_bytes) > 0
        assert 0 < r.peak_uss_bytes <= r.peak_rss_bytes
        assert r.steps == 2 and r.step_time_s > 0 and r.batch_size == 8
    report = profile_report("r", "dev000", profile_set.model_key, results)
    assert [e.width_ratio for e in report.entries] == [1.0, 0.25] and report.model_key == "case-model"


def test_a_point_that_fails_is_reported_not_raised(profile_set: ProfileSet, tmp_path: Path) -> None:
    # Prepare: a set whose one artifact has a corrupt graph
    root = tmp_path / "set"
    shutil.copytree(profile_set.root / "w0.25", root / "bad")
    (root / "bad" / "training_model.onnx").write_bytes(b"not a graph")
    write_profile_set_index(root, "k", "ort", [ProfileSetPoint(0.25, 8, "bad")])
    # Execute
    [result] = run_profile(load_profile_set(root), None, None, ProfileOptions(steps=1, warmup=0))
    # Assert
    assert result.error.startswith("exit 1: ArtifactError") and "(corrupt)" in result.error
    assert profile_report("r", "d", "k", [result]).entries == []
    assert "failed: exit 1" in format_table([result])[1]


def test_a_profile_of_another_kind_is_refused(profile_set: ProfileSet) -> None:
    with pytest.raises(ConfigError, match="holds ort artifacts; this device runs"):
        run_profile(profile_set, None, None, ProfileOptions(backends=("executorch",)))


def test_a_saved_profile_reads_back_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    results = [
        PointResult(1.0, 32, peak_rss_bytes=600 << 20, peak_uss_bytes=400 << 20, step_time_s=0.2),
        PointResult(0.5, 32, error="killed"),
    ]
    report = profile_report("r", "dev001", "key", results)
    save_profile(tmp_path / PROFILE_FILE, report)
    assert load_profile(tmp_path / PROFILE_FILE) == report
    assert load_profile(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text('{"type": "profile", "run_id": "r"}')
    with pytest.raises(ProtocolError, match="invalid profile"):
        load_profile(tmp_path / "bad.json")
    newer = msgspec.json.encode({**msgspec.to_builtins(report), "schema_version": 99})
    (tmp_path / "newer.json").write_bytes(newer)
    with pytest.raises(ProtocolError, match="schema version 99"):
        load_profile(tmp_path / "newer.json")


def test_the_profile_command_prints_a_table_and_saves_what_the_daemon_sends(
    case: Any, profile_set: ProfileSet, tmp_path: Path
) -> None:
    # Prepare: a device with a shard of the case's images (the command trains on it)
    x, y = random_batch(case.model, 24, np.random.default_rng(0))
    write_shard(tmp_path / "shard", x, y, {"name": "p", "task": "classification"})
    config = DeviceConfig(
        device_id="dev007",
        run_id="r1",
        data_dir=tmp_path / "shard",
        state_dir=tmp_path / "state",
        memory_budget_bytes=4 << 30,
    )
    (tmp_path / "device.toml").write_text(to_toml(config))
    # Execute
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msfusion.edge_runtime",
            "profile",
            "--config",
            str(tmp_path / "device.toml"),
            "--artifacts",
            str(profile_set.root),
            "--widths",
            "1,0.25",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("dev007: ort artifacts of model case-model, budget 4096 MiB")
    assert [line.split()[:2] for line in lines[2:4]] == [["ort", "1.000"], ["ort", "0.250"]]
    assert lines[2].endswith("yes")
    saved = load_profile(tmp_path / "state" / PROFILE_FILE)
    assert isinstance(saved, ProfileReport) and saved.device_id == "dev007" and saved.model_key == "case-model"
    assert [e.width_ratio for e in saved.entries] == [1.0, 0.25]


def test_the_profile_command_measures_every_backend_the_board_runs(
    case: Any, profile_set: ProfileSet, exported: Callable[..., CachedArtifact], tmp_path: Path
) -> None:
    # Prepare: a folder of two sets (ORT and torch), and one of a kind this board does not run
    root = tmp_path / "sets"
    shutil.copytree(profile_set.root, root / "ort")
    torch_artifact = exported(ArtifactKind.TORCH, widths=widths_for_ratio(model_spec(case.model), 0.25))
    shutil.copytree(torch_artifact.path, root / "torch" / "w0.25")
    write_profile_set_index(root / "torch", "case-model", "torch", [ProfileSetPoint(0.25, case.batch, "w0.25")])
    (root / "executorch").mkdir()
    write_profile_set_index(root / "executorch", "case-model", "executorch", [])
    config = DeviceConfig(
        device_id="dev008",
        run_id="r1",
        data_dir=tmp_path,
        state_dir=tmp_path / "state",
        memory_budget_bytes=4 << 30,
        backends=("ort", "torch"),
    )
    (tmp_path / "device.toml").write_text(to_toml(config))
    # Execute
    command = [sys.executable, "-m", "msfusion.edge_runtime", "profile", "--config", str(tmp_path / "device.toml")]
    command += ["--artifacts", str(root), "--widths", "0.25", "--steps", "1", "--warmup", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    # Assert
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("dev008: ort, torch artifacts of model case-model")
    saved = load_profile(tmp_path / "state" / PROFILE_FILE)
    assert saved is not None and [(e.backend, e.width_ratio) for e in saved.entries] == [("ort", 0.25), ("torch", 0.25)]
    assert all(e.peak_accelerator_bytes == 0 and e.step_time_s > 0 for e in saved.entries)  # the CPU


def test_profile_sets_of_two_models_or_two_of_one_kind_are_refused(tmp_path: Path) -> None:
    for folder, key, kind in [("a", "k1", "ort"), ("b", "k2", "torch")]:
        (tmp_path / folder).mkdir()
        write_profile_set_index(tmp_path / folder, key, kind, [])
    with pytest.raises(ConfigError, match="one model and one per kind"):
        load_profile_sets(tmp_path)
    write_profile_set_index(tmp_path / "b", "k1", "ort", [])
    with pytest.raises(ConfigError, match="one model and one per kind"):
        load_profile_sets(tmp_path)
    write_profile_set_index(tmp_path / "b", "k1", "torch", [])
    assert [s.kind for s in load_profile_sets(tmp_path)] == ["ort", "torch"]
    assert [s.kind for s in load_profile_sets(tmp_path / "a")] == ["ort"]


def test_the_profile_command_refuses_a_missing_set(tmp_path: Path) -> None:
    config = DeviceConfig(device_id="d", run_id="r", data_dir=tmp_path, state_dir=tmp_path, memory_budget_bytes=1 << 30)
    (tmp_path / "device.toml").write_text(to_toml(config))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msfusion.edge_runtime",
            "profile",
            "--config",
            str(tmp_path / "device.toml"),
            "--artifacts",
            str(tmp_path / "nowhere"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not a profile set" in proc.stderr


@pytest.mark.slow
def test_a_coordinator_profile_set_then_the_board_profile_measure_the_runs_artifacts(tmp_path: Path) -> None:
    # Prepare: a run file (the coordinator's) and a device without a shard (random batches)
    (tmp_path / "run.toml").write_text(
        f'backend = "ort"\nartifact_cache = "{tmp_path / "cache"}"\n'
        '[engine.model]\narch = "cnn"\nchannels = [8, 16, 32]\nimage_size = 16\n'
        "[engine.local]\nbatch_size = 8\n"
    )
    config = DeviceConfig(
        device_id="d", run_id="r", data_dir=tmp_path / "none", state_dir=tmp_path / "state", memory_budget_bytes=4 << 30
    )
    (tmp_path / "device.toml").write_text(to_toml(config))
    # Execute: the coordinator exports the run's profile set, the board measures it
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "msfusion.coordinator.cli.main",
            "devices",
            "profile-set",
            "--config",
            str(tmp_path / "run.toml"),
            "--out",
            str(tmp_path / "set"),
            "--widths",
            "1,0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stdout + export.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msfusion.edge_runtime",
            "profile",
            "--config",
            str(tmp_path / "device.toml"),
            "--artifacts",
            str(tmp_path / "set"),
            "--steps",
            "1",
            "--warmup",
            "0",
            "--no-save",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert: the run's model key, both widths at the run's batch size, nothing saved
    from msfusion.coordinator.fleet.artifacts import profile_key
    from msfusion.coordinator.fleet.config import load_config

    assert proc.returncode == 0, proc.stderr
    key = profile_key(load_config(tmp_path / "run.toml").engine)
    assert f"of model {key[:12]}" in proc.stdout.splitlines()[0]
    assert [line.split()[:3] for line in proc.stdout.splitlines()[2:4]] == [
        ["ort", "1.000", "8"],
        ["ort", "0.500", "8"],
    ]
    assert not (tmp_path / "state" / PROFILE_FILE).exists()
