"""The contrastive term against a hand computation on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msfusion.errors import ConfigError
from msfusion.models.config import ContrastiveVariant
from msfusion.models.objective import LocalObjective, contrastive_term


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_moon_term_matches_hand_computation() -> None:
    z = [[1.0, 0.0], [0.6, 0.8]]
    zg = [[1.0, 1.0], [0.0, 1.0]]
    zp = [[0.0, 1.0], [1.0, 0.0]]
    tau = 0.5
    expected = 0.0
    for a, g, p in zip(z, zg, zp):
        sg, sp = cos(a, g) / tau, cos(a, p) / tau
        expected += -math.log(math.exp(sg) / (math.exp(sg) + math.exp(sp)))
    expected /= 2
    got = contrastive_term(torch.tensor(z), torch.tensor(zg), torch.tensor(zp), tau, ContrastiveVariant.MOON)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_positive_only_and_off() -> None:
    z, zg = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    got = contrastive_term(z, zg, None, 0.5, ContrastiveVariant.POSITIVE)
    assert got.item() == pytest.approx((1 - 1 / math.sqrt(2)) / 0.5, rel=1e-6)
    assert contrastive_term(z, zg, None, 0.5, ContrastiveVariant.OFF).item() == 0.0
    with pytest.raises(ConfigError):
        contrastive_term(z, zg, None, 0.5, ContrastiveVariant.MOON)


class Toy(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.lin(x)
        return z, z


def test_objective_is_ce_plus_mu_times_term_and_refs_get_no_gradient() -> None:
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    y = torch.tensor([0, 1])
    model, glob, prev = Toy(torch.eye(2)), Toy(torch.ones(2, 2) * 0.5 + torch.eye(2)), Toy(-torch.eye(2))
    obj = LocalObjective(model, glob, prev, mu=0.3, tau=0.5, variant=ContrastiveVariant.MOON)
    loss = obj(x, y)
    ce = torch.nn.functional.cross_entropy(x, y)
    term = contrastive_term(x, glob.lin(x), prev.lin(x), 0.5, ContrastiveVariant.MOON)
    assert loss.item() == pytest.approx((ce + 0.3 * term).item(), rel=1e-6)
    loss.backward()
    assert model.lin.weight.grad is not None
    assert glob.lin.weight.grad is None and prev.lin.weight.grad is None
    plain = LocalObjective(Toy(torch.eye(2)), mu=0.0)
    assert plain(x, y).item() == pytest.approx(ce.item(), rel=1e-6)
