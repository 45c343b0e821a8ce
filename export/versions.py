"""The versions that shape an artifact: the exporters' own revision and the installed tools, per kind.

Part of every artifact's cache key and manifest; a device refuses an artifact
written by other versions than it runs (`export/validate.py`, `_check_versions`).
"""

from __future__ import annotations

import importlib.metadata

from msfusion.wire.artifacts import ArtifactKind

# The packages whose versions shape an artifact, per kind.
_TOOLS = {
    ArtifactKind.ORT: ("torch", "onnx", "onnxruntime-training"),
    ArtifactKind.EXECUTORCH: ("torch", "executorch"),
    ArtifactKind.TORCH: ("torch",),
}

# 4: ExecuTorch convolutions as im2col + mm, linear as mm + add; 5: im2col + bmm; 6: references apart;
# 7: unit-stride convolutions' input gradients by im2col of the output gradient, channels-last patches
EXPORTER_REVISION = "7"


def runtime_versions(kind: ArtifactKind) -> dict[str, str]:
    """Installed versions of the tools that export and run artifacts of `kind`."""
    # The exporters' own revision: bump it whenever a graph rewrite changes
    # what an artifact of the same shape contains, so cached ones are rebuilt.
    out = {"msfusion-exporter": EXPORTER_REVISION}
    for package in _TOOLS[ArtifactKind(kind)]:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "absent"
    return out
