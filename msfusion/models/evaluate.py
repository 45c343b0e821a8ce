"""Test figures of a model: loss and accuracy (classification) or perplexity (LM)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import numpy.typing as npt
import torch

from msfusion.data.datasets import ArrayDataset
from msfusion.models.config import ModelConfig
from msfusion.models.objective import cross_entropy
from msfusion.models.registry import build_model, load_numpy


@torch.no_grad()
def evaluate(
    model_cfg: ModelConfig,
    weights: Mapping[str, npt.NDArray[np.float32]],
    data: ArrayDataset,
    batch_size: int = 500,
    widths: Mapping[str, int] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Test figures of a model: loss and accuracy (classification) or perplexity (LM)."""
    model = build_model(model_cfg, widths)
    load_numpy(model, weights)
    model.to(device)
    model.eval()
    total_loss = 0.0
    correct = 0
    count = 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        logits, _ = model(x)
        n = int(y.numel())
        total_loss += float(cross_entropy(logits, y)) * n
        correct += int((logits.argmax(-1) == y).sum())
        count += n
    loss = total_loss / max(count, 1)
    if model_cfg.task == "lm":
        return {"loss": loss, "perplexity": float(np.exp(loss)), "accuracy": correct / max(count, 1)}
    return {"loss": loss, "accuracy": correct / max(count, 1)}
