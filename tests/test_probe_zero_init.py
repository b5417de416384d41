"""Zero-initialised layers (a zero head, ReZero / Fixup / `zero_init_residual` branches) pass no
gradient at step 0 to the layers before them, by design: those layers get one after the first
update. The probe called such nets "vanishing, error: initial weights too small for the depth".
An all-zero net, where nothing ever moves, stays vanishing (it was a ZeroDivisionError in the mean
field)."""

import math

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.probe.meanfield import q_star


class Branch(nn.Module):
    """x + fc2(relu(fc1(ln(x)))) with fc2 at zero, as ReZero / Fixup start a residual branch."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class ConvBlock(nn.Module):
    """A ResNet basic block with its last BatchNorm's weight at zero (torchvision's zero_init_residual)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        nn.init.zeros_(self.b2.weight)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def residual_mlp():
    return nn.Sequential(nn.Linear(8, 16), Branch(), Branch(), Branch(), nn.Linear(16, 3))


def zero_head_mlp():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.zeros_(model[4].weight)
    nn.init.zeros_(model[4].bias)
    return model


def zero_gamma_resnet():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ConvBlock(), ConvBlock(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("make,shape,waiting", [
    (residual_mlp, (6, 8), ["1.ln", "1.fc1", "2.ln", "2.fc1", "3.ln"]),
    (zero_head_mlp, (6, 8), ["0", "2"]),
    (zero_gamma_resnet, (4, 3, 6, 6), ["1.c1", "1.b1", "1.c2", "2.c1", "2.b1"]),
])
def test_layers_behind_a_zero_init_layer_are_waiting_not_vanishing(make, shape, waiting):
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    result = gw.probe(model, x, iters=0)
    by_name = {l.name: l for l in result.layers}
    assert all(by_name[n].grad_out_norm == 0 for n in waiting)  # the probe measured exact zeros
    assert result.verdict == "healthy" and not result.findings, [f.message for f in result.findings]
    (note,) = [n for n in result.notes if n.startswith("zero-initialised")]
    assert all(f"'{n}'" in note for n in waiting), note
    # the claim, checked with torch: after one SGD step every one of them has a gradient
    target = torch.randn(x.shape[0], 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        if step == 0:
            opt.step()
    for name in waiting:
        weight = model.get_submodule(name).weight
        assert weight.grad is not None and float(weight.grad.norm()) > 0, name


def test_an_all_zero_net_still_vanishes():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    for p in model.parameters():
        nn.init.zeros_(p)
    result = gw.probe(model, torch.randn(6, 8), iters=0)
    assert result.verdict == "vanishing" and [f.kind for f in result.findings] == ["vanishing_gradient"]
    assert not any(n.startswith("zero-initialised") for n in result.notes)
    mf = result.mean_field
    assert mf.sigma_w2 == 0 and mf.chi1 == 0 and mf.depth_scale == 0 and mf.too_deep


@pytest.mark.parametrize("act,sb2", [(nn.Tanh(), 0.0), (nn.Tanh(), 0.3), (nn.ReLU(), 0.05), (nn.GELU(), 0.0)])
def test_the_variance_map_at_zero_weights(act, sb2):
    """q ← σ_w² E[φ(√q z)²] + σ_b² is the constant σ_b² when σ_w² = 0: its fixed point is σ_b²."""
    assert q_star(act, 0.0, sb2) == sb2
    assert math.isfinite(q_star(act, 1e-3, sb2))
