"""The aarch64 install, run for real: the Raspberry Pi 4 bundle's wheels trained under qemu-user emulation.

What runs (`devices/emulation.py` prepares it; the first run downloads, later
runs reuse the cache in data/emulation/, or $MSFUSION_EMULATION_CACHE):

1. here, on x86_64: the session's ExecuTorch artifact of the small CNN
   (tests/conftest.py), exported by `export/executorch.py`; start weights and
   two batches; two `train_step`s with `ExecuTorchBackend` here, and the
   PyTorch reference (`export/validate.py::reference_train`);
2. the rpi4-4gb bundle's wheelhouse (`flash.fill_wheelhouse`: msfusion's own
   wheel, executorch 1.5.1 and torch 2.13.0 for manylinux_2_28_aarch64 and the
   rest of the closure, from PyPI), installed with the board's tags;
3. ONE aarch64 process: `qemu-aarch64-static -cpu cortex-a72 -L ROOT
   ROOT/usr/bin/python3.11 aarch64_board_run.py ...`, Debian bookworm's arm64
   CPython 3.11.2 and glibc 2.36 (Raspberry Pi OS bookworm's). It imports
   `msfusion.edge_runtime` and its daemon with torch blocked (no torch module
   may load), lifts the block, loads the artifact with `ExecuTorchBackend`
   (which imports torch: ExecuTorch's training bindings link libtorch), sets
   the same weights, trains the same two steps and writes `platform.machine()`,
   the losses and the weights;
4. here: the aarch64 losses and weights must match both x86_64 runs within
   `export.validate.Tolerance()`, the check every exported artifact passes.

Costs (2 cores): cold, about 3 GB of wheels (PyPI's aarch64 torch is a CUDA
build: its CUDA libraries come too) and 5 GB installed; warm, the emulated
process's 2 minutes (imports: torch and ExecuTorch's Python under emulation).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from msfusion.devices.emulation import EmulatedBoard, prepare_board
from msfusion.devices.profiles import BUILTIN_PROFILES
from msfusion.edge_runtime.backends.base import make_backend
from msfusion.export.cache import CachedArtifact
from msfusion.export.objective import random_batch, random_weights
from msfusion.export.validate import Tolerance, compare, reference_train
from msfusion.wire.artifacts import ArtifactKind, reference_weights

pytestmark = pytest.mark.slow

RPI = BUILTIN_PROFILES["rpi4-4gb"]
REPO = Path(__file__).resolve().parents[2]
BOARD_SCRIPT = Path(__file__).with_name("aarch64_board_run.py")
LR = 0.05
STEPS = 2


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> EmulatedBoard:
    """The emulated rpi4-4gb with the bundle's install; a missing prerequisite fails here, loudly."""
    cache = Path(os.environ.get("MSFUSION_EMULATION_CACHE") or REPO / "data" / "emulation" / "aarch64-py3.11")
    return prepare_board(RPI, cache, tmp_path_factory.mktemp("board"), REPO)


def test_the_aarch64_install_trains_like_x86_64(
    board: EmulatedBoard, exported: Callable[..., CachedArtifact], case: Any, tmp_path: Path
) -> None:
    # Prepare: the artifact, start weights and two batches, and the x86_64 runs
    artifact = exported(ArtifactKind.EXECUTORCH)
    trainable = random_weights(case.model, case.widths, seed=3)
    previous = random_weights(case.model, case.widths, seed=4)
    rng = np.random.default_rng(0)
    batches = [random_batch(case.model, case.batch, rng) for _ in range(STEPS)]
    inputs = tmp_path / "inputs.npz"
    np.savez(
        inputs,
        steps=np.array(STEPS),
        lr=np.array(LR),
        **{f"trainable/{name}": value for name, value in trainable.items()},
        **{f"previous/{name}": value for name, value in previous.items()},
        **{f"x{i}": x for i, (x, _) in enumerate(batches)},
        **{f"y{i}": y for i, (_, y) in enumerate(batches)},
    )
    backend = make_backend(artifact.manifest.kind)
    backend.load(artifact.path, artifact.manifest)
    backend.set_weights(trainable, reference_weights(artifact.manifest, trainable, previous))
    x86_losses = [backend.train_step(x, y, lr=LR) for x, y in batches]
    x86_weights = backend.weights()
    backend.close()
    ref_losses, ref_weights = reference_train(
        case.model, case.widths, case.moon, artifact.manifest.optimizer, trainable, trainable, previous, batches, LR
    )

    # Execute: one aarch64 process
    out = tmp_path / "aarch64.npz"
    started = time.perf_counter()
    proc = board.run([str(BOARD_SCRIPT), str(artifact.path), str(inputs), str(out)], timeout_s=900)
    elapsed = time.perf_counter() - started

    # Assert
    assert proc.returncode == 0, f"the emulated board failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = np.load(out)
    assert str(result["machine"]) == "aarch64"
    print(
        f"emulated process: {elapsed:.0f} s (torch-free import {float(result['core_import_s']):.1f} s, "
        f"in the guest {float(result['total_s']):.0f} s)"
    )
    losses = [float(v) for v in result["losses"]]
    weights = {k.split("/", 1)[1]: result[k] for k in result.files if k.startswith("weights/")}
    assert sorted(weights) == sorted(trainable)
    compare(losses, weights, x86_losses, x86_weights, Tolerance(), "aarch64 (emulated) vs x86_64 ExecuTorch")
    compare(losses, weights, ref_losses, ref_weights, Tolerance(), "aarch64 (emulated) vs the PyTorch reference")
    assert all(not np.array_equal(weights[n], trainable[n]) for n in weights)  # it trained
