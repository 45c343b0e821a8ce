"""End to end on the boards' own data: each device reads its own folder of photos; one device's data is unusable.

Three device processes each read a different folder of class subfolders of
PNG/JPEG files (Pillow, decoded lazily on the device), report per-channel
statistics and class counts at registration, and train under the
normalization and class order the coordinator agreed from those reports. A
fourth device holds only files that are not images: it reports why, the
coordinator leaves it out of planning, and the run goes on. The fleet's
merged model equals the reference engine trained on the same folders read
the same way (`load_shard_set`), so the preprocessing on the boards is the
coordinator's, number for number.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_harness import ENGINE, CoordinatorThread, Fleet, coordinator_config, max_abs_diff
from PIL import Image

from msfusion.coordinator.fleet.artifacts import ExportedArtifacts
from msfusion.coordinator.fleet.config import FleetConfig
from msfusion.coordinator.fleet.local_fleet import ShardSet, load_shard_set
from msfusion.coordinator.fleet.registry import ratio_for_memory
from msfusion.coordinator.reference.engine import ReferenceEngine
from msfusion.models.config import ModelConfig
from msfusion.models.registry import model_spec
from msfusion.wire.weights import unpack_weights

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = ModelConfig(arch="cnn", channels=(8, 16, 32), in_channels=3, image_size=32, num_classes=3)
CLASSES = {"cat": 0, "dog": 1, "owl": 2}  # each class tints one colour channel
HOLDS = {"dev000": ("cat", "dog"), "dev001": ("dog", "owl"), "dev002": ("cat", "owl")}


def write_photos(root: Path, classes: tuple[str, ...], n: int, rng: np.random.Generator) -> None:
    """`n` photos per class of odd sizes, PNG and JPEG, RGB and grayscale: the device resizes and converts."""
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 90, size=(36 + i % 5, 40, 3), dtype=np.uint8)
            pixels[..., CLASSES[name]] += 160
            image = Image.fromarray(pixels)
            image.save(folder / f"{i:03d}.png") if i % 3 else image.convert("RGB").save(folder / f"{i:03d}.jpg")


def decoded(root: Path) -> np.ndarray:
    """Every readable photo under `root` as the model takes it before normalization (independent of msfusion)."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix in (".png", ".jpg"):
            try:
                with Image.open(path) as image:
                    out.append(np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)))
            except OSError:
                continue
    return np.stack(out).astype(np.float64) / 255.0


def test_devices_train_their_own_photo_folders_and_a_device_without_usable_data_is_left_out(
    mosquitto: Any, tmp_path: Path
) -> None:
    # Prepare: three folders of photos, one of files that are not images, a held-out folder.
    rng = np.random.default_rng(0)
    folders = []
    for device, classes in HOLDS.items():
        write_photos(tmp_path / "boards" / device, classes, 40, rng)
        folders.append(tmp_path / "boards" / device)
    (tmp_path / "boards" / "dev000" / "dog" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "boards" / "dev001" / "empty").mkdir()
    broken = tmp_path / "boards" / "dev003" / "cat"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.png").write_bytes(rng.bytes(64))
    folders.append(broken.parent)
    write_photos(tmp_path / "held-out", tuple(CLASSES), 15, rng)
    shards = ShardSet(tuple(folders), tmp_path / "held-out", None, "images", "photos")
    engine = replace(ENGINE, model=MODEL, rounds=2)
    fleet = Fleet(tmp_path / "run", shards, "own-data", mosquitto.url)
    fleet.start_all()
    # Execute
    try:
        config = replace(
            coordinator_config(tmp_path / "run", "own-data", mosquitto.url, shards),
            engine=engine,
            fleet=FleetConfig(min_devices=4, wait_s=90.0, heartbeat_timeout_s=10.0),
        )
        coordinator = CoordinatorThread(config, ExportedArtifacts(engine, "ort", cache_dir=tmp_path / "artifacts"))
        coordinator.start()
        summary = coordinator.result(300)
    finally:
        codes = fleet.stop()
    # Assert: the run went on without dev003, which was told why (and logged it).
    assert summary.ok, summary.reason
    assert set(summary.excluded) == {"dev003"} and "no readable image" in summary.excluded["dev003"]
    assert "refused this device" in fleet.log(3) and "no readable image" in fleet.log(3)
    assert codes[3] != 0 and codes[:3] == [0, 0, 0]
    assert "truncated.png" in fleet.log(0) and "'empty' holds no image files" in fleet.log(1)
    # The agreed preprocessing is that of the three devices' pooled pixels, and the class names in order.
    pooled = np.concatenate([decoded(f) for f in folders[:3]])
    agreed = summary.preprocessing
    assert agreed["classes"] == ["cat", "dog", "owl"]
    assert np.allclose(agreed["mean"], pooled.mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(agreed["std"], pooled.std(axis=(0, 1, 2)), atol=1e-9)
    # The boards trained what the reference engine trains on the same folders, preprocessed the same way.
    prepared = load_shard_set(shards, MODEL)
    assert len(prepared.devices) == 3
    ratio = ratio_for_memory(model_spec(MODEL), 512 << 20, 0.5)
    reference = ReferenceEngine(engine, prepared.devices, prepared.test, [ratio] * 3)
    reference.run()
    merged = tmp_path / "run" / ("model-merged.safetensors" if summary.deployable != "merged" else "model.safetensors")
    assert max_abs_diff(unpack_weights(merged.read_bytes()), reference.weights) < 1e-3
    assert summary.final_metrics["accuracy"] > 0.5  # three tints: far above chance (1/3) after two rounds
