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


def sigmoid_stack(conv: bool, zero_head: bool, depth: int = 16) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv1d(8, 8, 3, padding=1) if conv else nn.Linear(8, 8), nn.Sigmoid()]
    layers += [nn.Flatten(), nn.Linear(8 * 12, 4)] if conv else [nn.Linear(8, 4)]
    if zero_head:
        nn.init.zeros_(layers[-1].weight)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("conv", [False, True])
def test_a_zero_head_does_not_make_a_vanishing_stack_healthy(conv):
    """Every layer before a zero head was called healthy whatever its depth: a 24-layer sigmoid CNN read
    healthy with a zero head, vanishing without. Reference: the same net with its head at torch's init."""
    x = torch.randn(4, 8, 12) if conv else torch.randn(4, 8)
    plain = gw.probe(sigmoid_stack(conv, zero_head=False), x, iters=0)
    zero = gw.probe(sigmoid_stack(conv, zero_head=True), x, iters=0)
    assert all(l.grad_out_norm == 0 for l in zero.layers[:-1])  # the zero head blocks it all at step 0
    assert plain.verdict == zero.verdict == "vanishing"
    want = [l.verdict for l in plain.layers]
    got = [l.verdict for l in zero.layers]
    assert got[:4] == want[:4] == ["vanishing"] * 4 and sum(a != b for a, b in zip(got, want)) <= 1, (got, want)
    assert [f.kind for f in zero.findings if f.kind == "vanishing_gradient"]


def test_a_zero_weight_norm_head_is_rejudged_through_its_originals():
    """weight_norm's weight is computed (g·v/‖v‖): with g = 0 the copy's zero weight is its original g,
    not the computed tensor (a KeyError, said as a model that could not be copied)."""
    model = sigmoid_stack(False, zero_head=False)
    head = torch.nn.utils.parametrizations.weight_norm(model[-1])
    with torch.no_grad():
        head.parametrizations.weight.original0.zero_()
    result = gw.probe(model, torch.randn(4, 8), iters=0)
    assert not any("could not be judged" in n for n in result.notes), result.notes
    assert [l.verdict for l in result.layers[:4]] == ["vanishing"] * 4


class DeadAndZeroSide(nn.Module):
    """A dead ReLU layer (no gradient, ever) and, later in the forward but not after it, a zero layer."""

    def __init__(self):
        super().__init__()
        self.dead, self.head, self.side = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        nn.init.constant_(self.dead.bias, -100.0)
        nn.init.zeros_(self.side.weight)

    def forward(self, x):
        return self.head(torch.relu(self.dead(x))) + self.side(x)


def test_only_a_zero_layer_downstream_makes_a_layer_wait():
    """A zero layer anywhere later in the forward order made a layer "waiting, healthy", also one whose
    gradient is zero for another reason (here a dead ReLU) and stays so after the zero layer moves."""
    torch.manual_seed(0)
    result = gw.probe(DeadAndZeroSide(), torch.randn(6, 8), iters=0)
    dead = next(l for l in result.layers if l.name == "dead")
    assert dead.grad_out_norm == 0 and dead.verdict == "vanishing"
    assert not any("'dead'" in n for n in result.notes), result.notes


def test_the_rejudging_leaves_the_model_and_the_global_rng_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
    nn.init.zeros_(model[3].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    result = gw.probe(model, torch.randn(6, 8), iters=0)
    after_probe = torch.rand(3)
    assert any(n.startswith("zero-initialised") for n in result.notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(5)
    model(torch.randn(6, 8))  # the one forward the probe makes with the user's RNG (its dropout)
    assert torch.equal(torch.rand(3), after_probe)


class ReZero(nn.Module):
    """x + α·f(x) with the scalar α at zero (Bachlechner et al. 2020): the branch's layers have no
    gradient at step 0, and α (a module's own parameter, no `.weight`) has one."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.alpha * self.fc2(torch.relu(self.fc1(x)))


def test_a_deep_scalar_rezero_net_is_healthy():
    """Its branch layers read vanishing (gain 0): α is no layer's `.weight`, so nothing waited on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *[ReZero() for _ in range(12)], nn.Linear(16, 3))
    result = gw.probe(model, torch.randn(8, 8), iters=0)
    branch = [l for l in result.layers if ".fc" in l.name]
    assert len(branch) == 24 and all(l.grad_out_norm == 0 for l in branch)
    assert result.verdict == "healthy" and {l.verdict for l in result.layers} == {"healthy"}
