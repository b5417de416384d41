"""A layer's Jacobian block runs through the layer: a side head, a parallel branch or a one-layer
residual branch reading the same input as the main path is measured on its own paths, against
torch.func.jacrev of that block."""

import pytest
import torch
from torch import nn

from gradwatch.probe import probe


def top_sv(f, x: torch.Tensor) -> float:
    """Largest singular value over the batch of the per-sample Jacobians of f (float64, explicit)."""
    return max(float(torch.linalg.svdvals(torch.func.jacrev(f)(row))[0]) for row in x)


class SideHead(nn.Module):
    """Two heads on one hidden layer, returned in a dict: the aux head's output reaches no later layer."""

    def __init__(self):
        super().__init__()
        self.f, self.g, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.f(x))
        return {"logits": self.g(h), "aux": self.aux(h)}


class ShortcutFirst(nn.Module):
    """A projection shortcut that runs before the main branch, both reading x; then x + f(x)."""

    def __init__(self):
        super().__init__()
        self.a, self.short, self.b = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.res, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        x = self.short(x) + torch.relu(self.b(x))
        x = x + torch.tanh(self.res(x))
        return self.head(x)


def test_a_side_head_is_its_own_block_not_the_main_paths():
    torch.manual_seed(0)
    model, x = SideHead().double(), torch.randn(3, 6, dtype=torch.float64)
    r = probe(model, x, iters=100)
    h = torch.tanh(model.f(x)).detach()
    assert r.layer("aux").sigma_max == pytest.approx(top_sv(model.aux, h), rel=1e-3)  # read g's before
    assert r.layer("g").sigma_max == pytest.approx(top_sv(model.g, h), rel=1e-3)
    assert abs(r.layer("aux").sigma_max - r.layer("g").sigma_max) > 0.05  # the two heads differ


def test_parallel_branches_and_a_one_layer_residual_hold_the_shortcut_fixed():
    """`short` and `b` both read x: each one's block is its own branch up to the sum. `res` reads the
    x of x + tanh(res(x)): its block is the branch, not I + the branch (docs/probe.md)."""
    torch.manual_seed(0)
    model, x = ShortcutFirst().double(), torch.randn(3, 6, dtype=torch.float64)
    r = probe(model, x, iters=100)
    h = torch.tanh(model.a(x)).detach()
    assert r.layer("short").sigma_max == pytest.approx(top_sv(model.short, h), rel=1e-3)
    assert r.layer("b").sigma_max == pytest.approx(top_sv(lambda t: torch.relu(model.b(t)), h), rel=1e-3)
    s = (model.short(h) + torch.relu(model.b(h))).detach()
    branch = top_sv(lambda t: torch.tanh(model.res(t)), s)
    assert r.layer("res").sigma_max == pytest.approx(branch, rel=1e-3)
    assert top_sv(lambda t: t + torch.tanh(model.res(t)), s) > 1.2 * branch  # what it read before
