"""The ORT training graph carries the exporter's speed rewrites (fused norms, no unread pool indices).

Parity (test_parity.py) shows these rewrites keep the math; these tests show
they are there, so a change to the exporter cannot drop them silently.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import onnx

from msfusion.edge_runtime.backends.ort import TRAINING_MODEL
from msfusion.export.cache import CachedArtifact
from msfusion.wire.artifacts import ArtifactKind


def _training_graph(exported: Callable[..., CachedArtifact]) -> onnx.GraphProto:
    artifact = exported(ArtifactKind.ORT)  # the MOON CNN the parity tests export too (cached)
    return onnx.load(artifact.path / TRAINING_MODEL).graph


def test_group_norms_are_layer_normalization_with_statistics(
    case: Any, exported: Callable[..., CachedArtifact]
) -> None:
    # Prepare
    graph = _training_graph(exported)
    ops = Counter(node.op_type for node in graph.node)
    # Assert: one fused norm per block in each of the three copies (model, global_ref, prev_ref)
    assert ops["LayerNormalization"] == 3 * len(case.model.channels)
    assert ops["LayerNormalizationGrad"] == len(case.model.channels)  # only the trained copy
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            assert len(node.output) == 3, node.name  # Y, Mean, InvStdDev: the gradient reads the last two
    decomposed = [node.name for node in graph.node if node.op_type == "Sqrt" and "/norm" in node.name]
    assert decomposed == []  # the elementwise decomposition (ReduceMean, Sub, Mul, Sqrt, Div) is gone


def test_only_the_trained_copy_computes_pool_indices(case: Any, exported: Callable[..., CachedArtifact]) -> None:
    # Prepare
    graph = _training_graph(exported)
    read = {name for node in graph.node for name in node.input}
    pools = [node for node in graph.node if node.op_type == "MaxPool"]
    # Assert
    assert len(pools) == 3 * len(case.model.channels)
    with_indices = [node for node in pools if len(node.output) == 2]
    assert all(node.output[1] in read for node in with_indices)
    assert len(with_indices) == len(case.model.channels)
    assert all(node.name.startswith("/model/") for node in with_indices)
