"""`--data` on the coordinator's commands: a new user's own photos and text, every strategy, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from msfusion.coordinator.cli.main import ExitCode, app
from msfusion.wire.weights import unpack_weights

runner = CliRunner()
TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, again and again.\n" for i in range(400))


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 30 tinted RGB photos, PNG and JPEG, of odd sizes."""
    root = tmp_path_factory.mktemp("own") / "photos"
    rng = np.random.default_rng(1)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 80, size=(30 + i % 4, 36, 3), dtype=np.uint8)
            pixels[..., c] += 170
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def some_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "some.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_the_char_lm_trains_from_a_text_file(some_text: Path, tmp_path: Path) -> None:
    args = ["train", "--model", "charlm", "--data", str(some_text), "--devices", "2", "--rounds", "2"]
    result = runner.invoke(app, [*args, "--local-samples", "32", "--out", str(tmp_path)])
    assert result.exit_code == ExitCode.SUCCESS, result.output
    out = _plain(result.output)
    assert "some: 2 devices" in out and "each device trains" in out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["metrics"]["perplexity"]) for line in lines)
    # The vocabulary is the text's characters and one out-of-vocabulary id.
    weights = unpack_weights((tmp_path / "model.safetensors").read_bytes())
    assert weights["tok_emb.weight"].shape[0] == len(set(TEXT)) + 1


def test_photos_train_under_every_strategy_and_the_cost_per_device_is_printed(photos: Path, tmp_path: Path) -> None:
    common = ["--data", str(photos), "--devices", "2", "--rounds", "1", "--local-samples", "32", "--partition", "iid"]
    split = runner.invoke(app, ["train", *common, "--budget", "1/4", "--lr", "0.1", "--out", str(tmp_path / "a")])
    small = runner.invoke(app, ["train", *common, "--strategy", "fedavg-small", "--out", str(tmp_path / "b")])
    assert split.exit_code == ExitCode.SUCCESS, split.output
    assert small.exit_code == ExitCode.SUCCESS, small.output
    assert re.search(r"photos: 2 devices, \d+ samples; model cnn", _plain(split.output))
    assert "(split)" in _plain(split.output) and "trained whole" in _plain(small.output)
    # The model takes what the data is: 3-channel 32x32 images of 3 classes.
    weights = unpack_weights((tmp_path / "a" / "model.safetensors").read_bytes())
    first = min((w for w in weights.values() if w.ndim == 4), key=lambda w: w.shape[1])
    last = [w for w in weights.values() if w.ndim == 2][-1]
    assert first.shape[1] == 3 and last.shape[0] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "charlm"], "is images, and --model charlm trains text"),
        (["--strategy", "fedavg", "--ratio", "0.5"], "drop --ratio/--budget, or use fedavg-small"),
        (["--partition", "dirichlet:lots"], "--partition must be iid, dirichlet:ALPHA, shards:K or natural"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_data_that_does_not_fit_gets_a_clear_error(photos: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["train", "--data", str(photos), "--rounds", "1", "--devices", "2", "--partition", "iid"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path), *args])
    assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
    assert message in _plain(result.output) and "Traceback" not in result.output


def test_a_missing_data_set_is_a_data_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert result.exit_code == ExitCode.DATA_ERROR, result.output
    assert "does not exist" in _plain(result.output) and "Traceback" not in result.output


def test_partition_deals_whole_text_files_to_devices_under_natural(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    for i in range(4):
        (books / f"book{i}.txt").write_text(TEXT[: 2000 * (i + 1)], encoding="utf-8")
    result = runner.invoke(
        app,
        ["partition", "--data", str(books), "--devices", "2", "--partition", "natural", "--out", str(tmp_path / "s")],
    )
    assert result.exit_code == ExitCode.SUCCESS, result.output
    files = [sorted((tmp_path / "s" / d).glob("*.txt")) for d in ("dev000", "dev001")]
    assert [len(f) for f in files] == [2, 2]  # longest-first: books 3+0 and 2+1
    held = sum(len(p.read_text()) for f in files for p in f) + len((tmp_path / "s" / "test" / "test.txt").read_text())
    assert held == sum(2000 * (i + 1) for i in range(4)) + 3  # every character kept (the test joins 4 tails by "\n")
