"""An activation that draws random numbers in train mode (nn.RReLU's slope) must not be drawn by the
probe's mean field: the user's RNG stream moves on only as one forward would, and χ₁ is the same on
every probe."""

import torch
from torch import nn

import gradwatch as gw


def rrelu_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.RReLU(), nn.Linear(16, 16), nn.RReLU(), nn.Linear(16, 16),
                         nn.RReLU(), nn.Linear(16, 2))


def test_rrelu_mean_field_leaves_the_rng_as_one_forward_and_is_deterministic():
    model, x = rrelu_mlp(), torch.randn(4, 8)
    torch.manual_seed(5)
    model(x)  # the forward the probe runs, in train mode: its RReLUs draw their slopes
    after_forward = torch.rand(3)
    torch.manual_seed(5)
    first = gw.probe(model, x, iters=0)
    assert torch.equal(torch.rand(3), after_forward)
    second = gw.probe(model, x, iters=0)
    assert first.mean_field.chi1 == second.mean_field.chi1
    # eval slope (lower + upper) / 2 = 11/48: E[φ'(z)²] = 1/2 + (11/48)²/2, so χ₁ = σ_w² times that at any q
    assert abs(first.mean_field.chi1 / first.mean_field.sigma_w2 - (0.5 + 0.5 * (11 / 48) ** 2)) < 1e-6
