"""An adaptive optimizer at far too high an lr: its first step, lr·sign(g) per weight, rewrites the
weights' scale, and the loss stalls high with no finding (a tiny GPT at AdamW lr 0.1: 3.54 -> 3.11,
where lr 1e-3 reached 1.04). Said as a plateau on steps too long, told to lower the lr."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from gradwatch.diagnose.rules.loss import first_adaptive_step
from series_builder import build


def _run(first_ratio: float, fell_to: float, optimizer: str = "Adam"):
    """A hand-built run whose first update changed each layer by `first_ratio` of its norm and whose
    loss ends at `fell_to` of where it started."""
    run = build(n_steps=100, optimizer=optimizer, lr=0.1)
    for c in [i for i, l in enumerate(run.layers) if l.role == "param"]:
        run.metrics["update_ratio"][0, c] = first_ratio
    rng = np.random.default_rng(1)
    run.loss[:] = 2.0 * (1 - (1 - fell_to) * (1 - np.exp(-np.arange(100) / 10))) * (1 + 0.01 * rng.standard_normal(100))
    return run


def _stalled(run):
    return [f for f in diagnose(run) if f.kind == "loss_plateau" and "first_update_ratio" in f.evidence]


def test_long_adaptive_steps_and_a_loss_that_stalls_are_a_plateau_told_to_lower_the_lr():
    (f,) = _stalled(_run(0.8, fell_to=0.85))
    assert f.severity == "warning" and abs(f.evidence["first_update_ratio"] - 0.8) < 1e-9
    assert f.remedies[0].action.startswith("Lower the learning rate") and "0.01" in f.remedies[0].action
    assert not any(r.action.startswith("Raise") for r in f.remedies)


def test_not_said_when_the_loss_halves_under_sgd_or_on_short_steps():
    assert _stalled(_run(0.8, fell_to=0.3)) == []  # a small init under Adam: long first steps, learning
    assert _stalled(_run(0.8, fell_to=0.85, optimizer="SGD")) == []  # SGD's step is lr·g: exploding's
    assert _stalled(_run(0.05, fell_to=0.85)) == []


def test_not_said_under_optimizers_whose_first_step_is_no_measure_of_the_later_ones():
    """RMSprop's running average starts at 0 (a first step ~10x lr) and Adagrad's steps shrink as
    1/sqrt(t): a wide MLP at their usual lrs read 0.55 at the first step, 0.01 by the 50th."""
    for optimizer in ("RMSprop", "Adagrad", "Adadelta"):
        assert _stalled(_run(0.8, fell_to=0.85, optimizer=optimizer)) == [], optimizer
    for optimizer in ("AdamW", "NAdam", "Adamax"):
        assert len(_stalled(_run(0.8, fell_to=0.85, optimizer=optimizer))) == 1, optimizer


def test_the_first_adam_step_measured_is_lr_over_the_weights_rms():
    """The rule's premise: Adam's first step is lr·sign(g), so the store's first update ratio of a
    layer is lr·sqrt(n)/‖w‖, computed here from the initial weights in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    lr = 0.05
    expected = [lr * np.sqrt(m.weight.numel() + m.bias.numel())
                / float(torch.cat([m.weight.detach().double().flatten(), m.bias.detach().double()]).norm())
                for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert abs(first_adaptive_step(w.series()) / np.median(expected) - 1) < 1e-3


def test_not_said_of_a_loss_below_zero():
    """A negative log-likelihood or a critic's loss has no half to reach: no stall is read into it."""
    run = _run(0.8, fell_to=0.85)
    run.loss[:] = -run.loss
    assert _stalled(run) == []
