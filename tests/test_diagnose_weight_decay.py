"""Weight decay strong enough to shrink the weights toward 0: the update ratio against a norm near
0 is no exploding gradient, and the gradient vanishing below the shrunk weights is the decay's
doing (not the init's): weaken it by the shrink's power of ten."""

import math

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from series_builder import build, kinds, sampled


def _decayed(shrink: bool):
    """Weights 10 -> 0.05 by step 100 (or kept at 10), an update ratio of 2.4 at step 50 and the
    lowest layer's ∂L/∂s at 1e-8 of the others' from step 100."""
    run = build(n_steps=200)
    rows = sampled(run)
    cols = [run.column(f"fc{i}") for i in range(5)]
    if shrink:
        scale = np.maximum(10.0 * np.exp(-run.steps[rows] / 19.0), 0.05)
        run.metrics["weight_norm"][np.ix_(rows, cols)] = scale[:, None]
    run.metrics["update_ratio"][run.steps == 50, run.column("fc1")] = 2.4
    late = rows[run.steps[rows] >= 100]
    run.metrics["grad_out_rms"][late, run.column("fc0")] = 1e-10
    return run


def test_shrunk_weights_are_no_exploding_gradient_and_their_vanishing_is_the_decays():
    run = _decayed(shrink=True)
    found = diagnose(run)
    assert "exploding_gradient" not in kinds(found)
    v = next(f for f in found if f.kind == "vanishing_gradient")
    w = run.metrics["weight_norm"][:, [run.column(f"fc{i}") for i in range(5)]]
    w = w[np.isfinite(w).all(axis=1)]
    shrink = np.linalg.norm(w[w.shape[0] // 2]) / np.linalg.norm(w[0])  # by step 100, in float64
    assert math.isclose(v.evidence["weight_shrink"], shrink, rel_tol=1e-6)
    assert v.causes[0].startswith("weight decay:") and v.remedies[0].action.startswith("Weaken the weight decay 1000-fold")
    assert "*= 0.001" in v.remedies[0].code and not any(r.code.startswith("gw.init_") for r in v.remedies)
    # the same run with its weights kept: the overshoot and the init's vanishing, as before
    found = diagnose(_decayed(shrink=False))
    assert "exploding_gradient" in kinds(found)
    v = next(f for f in found if f.kind == "vanishing_gradient")
    assert "weight_shrink" not in v.evidence and any(r.code.startswith("gw.init_") for r in v.remedies)


def _train(weight_decay: float, steps: int = 300, hidden: int = 2):
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x @ torch.randn(16, 4)).argmax(1)
    layers = [nn.Linear(16, 64), nn.ReLU()] + [nn.Linear(64, 64), nn.ReLU()] * (hidden - 1)
    model = nn.Sequential(*layers, nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    watch = gw.watch(model, opt, warn=False)
    losses = []
    for i in range(steps):
        b = slice(64 * (i % 8), 64 * (i % 8 + 1))
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    found = watch.findings()
    watch.detach()
    return found, losses


def test_a_real_run_decayed_to_zero_is_told_to_weaken_the_decay_and_that_works():
    found, losses = _train(1.0)
    assert "exploding_gradient" not in kinds(found)
    v = next(f for f in found if f.kind == "vanishing_gradient")
    assert v.causes[0].startswith("weight decay:")
    factor = float(v.remedies[0].code.split("*= ")[1].split()[0])
    found, fixed = _train(1.0 * factor)  # the remedy as said
    assert [f for f in found if f.severity != "info"] == [] and np.mean(fixed[-20:]) < 0.5 * np.mean(losses[-20:])


def test_a_shallow_net_decayed_to_zero_plateaus_and_is_told_to_weaken_the_decay_not_to_raise_the_lr():
    """One hidden layer: no depth profile to vanish across, only the plateau, which said "raise the
    learning rate tenfold" (lr x weight_decay a step: the decay ten times faster)."""
    found, losses = _train(1.0, steps=200, hidden=1)
    (f,) = [f for f in found if f.kind == "loss_plateau"]
    assert f.causes[0].startswith("weight decay:") and "Raise the learning rate" not in f.message
    factor = float(f.remedies[0].code.split("*= ")[1].split()[0])
    found, fixed = _train(1.0 * factor, steps=200, hidden=1)
    assert [f for f in found if f.severity != "info"] == [] and np.mean(fixed[-20:]) < 0.5 * np.mean(losses[-20:])
