"""A board without torch imports the training core and trains an ONNX Runtime artifact.

The subprocess simulates a missing torch the way Python sees one:
`sys.modules["torch"] = None` makes `import torch` fail and
`importlib.util.find_spec("torch")` return None (onnxruntime probes with
it), and a meta-path finder refuses every `torch.*` submodule.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from msfusion.edge_runtime.backends.base import make_backend
from msfusion.edge_runtime.trainer import train_local
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.wire.artifacts import ArtifactKind, pack_artifact, reference_weights
from msfusion.wire.weights import pack_weights, unpack_weights

NO_TORCH = """
import importlib, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None
sys.meta_path.insert(0, NoTorch())
sys.modules["torch"] = None
"""

CHECK_LOADED = """
loaded = sorted(m for m in sys.modules if (m == "torch" and sys.modules[m] is not None) or m.startswith("torch."))
assert not loaded, loaded
"""

TRAIN = """
from pathlib import Path
import numpy as np
from msfusion.wire.artifacts import reference_weights, unpack_artifact
from msfusion.edge_runtime.backends.base import make_backend
from msfusion.edge_runtime.trainer import train_local
from msfusion.wire.weights import pack_weights, unpack_weights

work = Path(sys.argv[1])
manifest = unpack_artifact((work / "artifact.tar").read_bytes(), work / "artifact")
start = unpack_weights((work / "start.safetensors").read_bytes())
shard = np.load(work / "shard.npz")
backend = make_backend(manifest.kind)
backend.load(work / "artifact", manifest)
result = train_local(backend, start, reference_weights(manifest, start), shard["x"], shard["y"],
                     epochs=1, batch_size=manifest.batch_size, lr=0.05, seed=3)
(work / "trained.safetensors").write_bytes(pack_weights(result.weights))
"""


@pytest.mark.parametrize(
    "module",
    [
        "edge_runtime.backends.base",
        "edge_runtime.backends.ort",
        "wire.artifacts",
        "edge_runtime.trainer",
        "edge_runtime.memory",
    ],
)
def test_the_training_core_imports_without_torch(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH + f"importlib.import_module('msfusion.{module}')" + CHECK_LOADED],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_blocker_blocks_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH + "import torch"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_a_board_without_torch_trains_an_ort_artifact(
    tmp_path: Path, case: Any, exported: Callable[..., CachedArtifact]
) -> None:
    # Prepare: what the coordinator sends (artifact blob, weights) and the device's shard
    artifact = exported(ArtifactKind.ORT)
    start = random_weights(case.model, case.widths, seed=5)
    x, y = random_batch(case.model, 3 * case.batch, np.random.default_rng(2))
    (tmp_path / "artifact.tar").write_bytes(pack_artifact(artifact.path))
    (tmp_path / "start.safetensors").write_bytes(pack_weights(start))
    np.savez(tmp_path / "shard.npz", x=x, y=y)
    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH + TRAIN + CHECK_LOADED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert: the same weights as the same run in this process
    assert proc.returncode == 0, proc.stderr
    trained = unpack_weights((tmp_path / "trained.safetensors").read_bytes())
    backend = make_backend(ArtifactKind.ORT)
    backend.load(artifact.path, artifact.manifest)
    here = train_local(
        backend,
        start,
        reference_weights(artifact.manifest, start),
        x,
        y,
        epochs=1,
        batch_size=case.batch,
        lr=0.05,
        seed=3,
    )
    assert sorted(trained) == sorted(here.weights)
    for name, value in here.weights.items():
        np.testing.assert_allclose(trained[name], value, atol=1e-6, err_msg=name)
        assert not np.array_equal(value, start[name])
