"""A derivative taken inside the loss (a PINN's ∂u/∂x by torch.autograd.grad with create_graph, its
hooks run with grad mode on, outside any loss's backward) is no backward of the loss: the
∂L/∂output recorded is the loss's alone. A tester's PINN had its layers' du/dh (1e-8 to 2)
averaged in for ∂L/∂h (~1e-10)."""

import math

import pytest
import torch
from torch import nn

import gradwatch as gw


def _pinn_loss(model, x, order=2):
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)  # ∂u/∂x, differentiable
    if order == 1:  # a gradient penalty's first derivative alone
        return (du - torch.cos(x)).pow(2).mean() + u[:1].pow(2).mean()
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)  # u''
    return (d2u + torch.sin(x)).pow(2).mean() + u[:1].pow(2).mean()


def test_a_derivative_inside_the_loss_leaves_the_loss_gradient_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    outs = {}
    for name in ("0", "2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, y, name=name: outs.__setitem__(name, y))
    x = torch.linspace(0, math.pi, 64).unsqueeze(1).requires_grad_()
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        loss = _pinn_loss(model, x)
        reference = torch.autograd.grad(loss, [outs["0"], outs["2"]], retain_graph=True)  # ∂L/∂h, as torch has it
        opt.zero_grad()
        loss.backward()
        opt.step()
        run = watch.series()
    for name, g in zip(("0", "2"), reference):
        expected = (torch.linalg.vector_norm(g) / math.sqrt(g.numel())).item()
        assert run.metrics["grad_out_rms"][0, run.column(name)] == pytest.approx(expected, rel=1e-5)
    assert run.meta["input_derivatives"] is True  # u'': diagnose keeps a swap smooth
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        opt.zero_grad()
        _pinn_loss(model, x, order=1).backward()  # one derivative (WGAN-GP's dD/dx): a ReLU's u'' does not matter
        opt.step()
        assert "input_derivatives" not in watch.series().meta


def test_a_gradient_taken_for_the_parameters_is_the_steps():
    """A functional step (a loop that sets p.grad itself) takes its gradient with torch.autograd.grad
    for the parameters, no graph kept: recorded as the backward of the loss it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        y = model(torch.randn(16, 4))
        grads = torch.autograd.grad(y.pow(2).mean(), model.parameters())  # (a generator: read once, whole)
        assert len(grads) == 4
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
        run = watch.series()
    assert run.metrics["grad_out_rms"][0, run.column("0")] > 0
    assert "input_derivatives" not in run.meta


def test_a_pinns_saturating_activations_are_swapped_for_a_smooth_one():
    """A ReLU network's second derivative is 0: a tester's sigmoid PINN, told to swap to Leaky ReLU,
    could not fall below the residual's mean square; tanh took it 5000x lower, SiLU (smooth, and
    not saturating as tanh does) further."""
    from series_builder import build

    run = build(activation="sigmoid")
    run.metrics["grad_out_rms"][:, run.column("fc0")] *= 1e-6  # vanishing toward the input
    (plain,) = [f for f in gw.diagnose(run) if f.kind == "vanishing_gradient"]
    assert "nn.LeakyReLU(0.01)" in plain.remedies[0].code
    run.meta["input_derivatives"] = True
    (pinn,) = [f for f in gw.diagnose(run) if f.kind == "vanishing_gradient"]
    assert pinn.remedies[0].action.startswith("Swap the saturating activations for SiLU: the loss differentiates")
    norms = [r.code for r in pinn.remedies if "insert_norm" in r.code]  # per sample: BatchNorm mixes them
    assert norms and all("'layer'" in c for c in norms) and any("'batch'" in r.code for r in plain.remedies)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    code = pinn.remedies[0].code.replace("gw.init_(model)", "")
    exec(code, {"gw": gw, "nn": nn, "model": model, "batch": torch.randn(2, 4)})
    swapped = [type(m).__name__ for m in model.modules()]
    assert "SiLU" in swapped and "Sigmoid" not in swapped


COMPILED_PENALTY = """
import sys, torch, torch.nn as nn
torch.manual_seed(0)
D = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.Adam(D.parameters(), 1e-3)
if sys.argv[1:] == ["watch"]:
    import gradwatch as gw
    w = gw.watch(D, opt, warn=False)
@torch.compile(backend="eager")
def loss_fn(x):
    x = x.requires_grad_(True)
    out = D(x)
    g, = torch.autograd.grad(out.sum(), x, create_graph=True)
    return -out.mean() + 10 * ((g.norm(dim=1) - 1) ** 2).mean()
for step in range(4):
    loss = loss_fn(torch.randn(8, 4))
    opt.zero_grad(); loss.backward(); opt.step()
print(loss.item(), [p.sum().item() for p in D.parameters()])
"""


def test_a_compiled_gradient_penalty_under_a_watch_trains_as_without_it(tmp_path):
    """A reviewer's WGAN-GP loss under torch.compile: the first way of telling a derivative inside the
    loss (a wrapper of torch.autograd.grad) was inlined by dynamo, and the compiled loss failed."""
    import os
    import subprocess
    import sys

    (tmp_path / "gp.py").write_text(COMPILED_PENALTY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.run([sys.executable, "gp.py", *args], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=300) for args in ([], ["watch"])]
    assert [r.returncode for r in runs] == [0, 0], runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout  # the same losses and weights, bit for bit (printed in full)


def test_a_relu_pinns_dead_units_are_told_a_smooth_activation():
    """A reviewer's ReLU PINN with dead units was told Leaky ReLU: its u'' is 0 too (stuck at 45.69;
    SiLU reached 0.0003)."""
    from series_builder import build, sampled

    run = build()
    run.metrics["dead"][sampled(run)[3]:, run.column("act1")] = 0.9
    run.meta["input_derivatives"] = True
    (f,) = [f for f in gw.diagnose(run) if f.kind == "dead_units"]
    assert f.causes[0].startswith("activation: the loss differentiates the model") and "nn.SiLU()" in f.remedies[0].code
