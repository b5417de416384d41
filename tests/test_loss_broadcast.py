"""A regression loss whose target broadcasts against the prediction ((B, 1) against (B,): a (B, B)
grid) trains every prediction toward the targets' mean. A tester's 1D CNN was told its gradient
vanished from a bad initialisation; torch's own warning named the shapes. The watch reads it."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnose import diagnose


def _train(broadcast: bool, watched: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    y = x[:, 0] * 2 + 0.1 * torch.randn(64)
    watch = gw.watch(model, opt, warn=False) if watched else None
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # (shown once per place, as outside a test)
        for _ in range(60):
            pred = model(x)
            loss = F.mse_loss(pred if broadcast else pred.view_as(y), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = watch.series() if watch else None
    if watch:
        watch.detach()
    return run, loss.item(), [p.detach().clone() for p in model.parameters()]


def test_a_target_that_broadcasts_into_a_grid_is_an_error_with_the_shapes_and_the_line():
    run, loss, weights = _train(broadcast=True)
    f = next(f for f in diagnose(run) if f.kind == "loss_broadcast")
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "if broadcast else" in text)
    assert f.severity == "error" and f.evidence["where"] == f"test_loss_broadcast.py:{line}"
    assert f.evidence["broadcast_shape"] == [64, 64] and "every prediction against every target" in f.message
    assert "pred.view_as(y)" in f.remedies[0].code
    _, unwatched, same = _train(broadcast=True, watched=False)
    assert loss == unwatched and all(torch.equal(a, b) for a, b in zip(weights, same))  # nothing changed


def test_matching_shapes_are_no_finding():
    run, _, _ = _train(broadcast=False)
    assert not [f for f in diagnose(run) if f.kind == "loss_broadcast"]
