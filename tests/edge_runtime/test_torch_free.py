"""The edge runtime core imports on a board without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch_block import BLOCK_TORCH

EDGE = Path(__file__).resolve().parents[2] / "edge_runtime"
# Modules that must exist, plus every other core module present (backends/executorch.py may load torch).
REQUIRED = ["protocol", "topics", "transport", "bulk", "weights"]
CORE = sorted(set(REQUIRED) | {p.stem for p in EDGE.glob("*.py") if p.stem not in ("__init__", "__main__")} | {"shards"})



@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_without_torch(module: str) -> None:
    if module not in REQUIRED and not (EDGE / f"{module}.py").exists():
        pytest.skip(f"edge_runtime/{module}.py is not written yet")
    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, f"msfusion.edge_runtime.{module}"],
        capture_output=True, text=True, timeout=60,
    )
    # Assert
    assert proc.returncode == 0, proc.stderr


def test_the_blocker_really_blocks() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "torch.nn"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
