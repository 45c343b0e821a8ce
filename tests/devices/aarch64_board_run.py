"""Runs on the emulated aarch64 board (one qemu-user process), not under pytest.

    python3.11 aarch64_board_run.py ARTIFACT_DIR INPUTS.npz OUT.npz

1. imports `msfusion.edge_runtime` with torch blocked and checks that no torch
   module got loaded (the torch-free core the daemon starts with);
2. lifts the block and trains the artifact with `ExecuTorchBackend` (which
   loads torch: ExecuTorch's training bindings link libtorch) from the
   weights in INPUTS.npz, one `train_step` per batch, at INPUTS' lr;
3. writes the machine, the losses and the trained weights to OUT.npz.

Standard library and the board's install only: no pytest, no test helpers.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path


class NoTorch:
    """A meta path finder that refuses torch."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked on the board's import check ({name})")
        return None


def main(artifact_dir: Path, inputs: Path, out: Path) -> None:
    started = time.perf_counter()
    blocker = NoTorch()
    sys.meta_path.insert(0, blocker)
    importlib.import_module("msfusion.edge_runtime")
    importlib.import_module("msfusion.edge_runtime.daemon")
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not loaded, f"the torch-free runtime loaded {loaded}"
    sys.meta_path.remove(blocker)
    core_s = time.perf_counter() - started

    import numpy as np

    from msfusion.edge_runtime.backends.base import make_backend
    from msfusion.wire.artifacts import load_manifest, reference_weights

    data = np.load(inputs)
    trainable = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("trainable/")}
    previous = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("previous/")}
    steps = int(data["steps"])
    manifest = load_manifest(artifact_dir)
    backend = make_backend(manifest.kind)
    backend.load(artifact_dir, manifest)
    backend.set_weights(trainable, reference_weights(manifest, trainable, previous))
    losses = [backend.train_step(data[f"x{i}"], data[f"y{i}"], lr=float(data["lr"])) for i in range(steps)]
    weights = backend.weights()
    backend.close()
    np.savez(
        out,
        machine=np.array(platform.machine()),
        core_import_s=np.array(core_s),
        total_s=np.array(time.perf_counter() - started),
        losses=np.array(losses, dtype=np.float64),
        **{f"weights/{name}": value for name, value in weights.items()},
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
