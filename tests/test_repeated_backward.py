"""A second backward of the same loss in one step adds its gradient twice (a tester's script kept a
debugging `loss.backward(retain_graph=True)` before its `loss.backward()`): said as a finding with
the script's line, and the loss recorded once, not as two micro-batches (fix had reported every
loss doubled). Micro-batches, and a backward after the gradients were cleared, are not it."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose


def _train(how: str, optimizer=torch.optim.SGD, steps: int = 6, watched: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = optimizer(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    watch = gw.watch(model, opt, warn=False) if watched else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if how == "micro":  # two halves of the batch, two losses: accumulation on purpose
            for half in (slice(0, 16), slice(16, 32)):
                (((model(x[half]) - y[half]) ** 2).mean() / 2).backward()
            losses.append(float(((model(x) - y) ** 2).mean()))
            opt.step()
            continue
        loss = ((model(x) - y) ** 2).mean()
        losses.append(float(loss))
        if how == "disjoint":  # each backward fills its own parameters: none twice
            loss.backward(inputs=list(model[2].parameters()), retain_graph=True)
            loss.backward(inputs=list(model[0].parameters()))
            opt.step()
            continue
        loss.backward(retain_graph=True)
        if how == "cleared":
            opt.zero_grad()
        elif how == "zeroed":
            opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    run = watch.series() if watch else None
    if watch:
        watch.detach()
    return run, losses, [p.detach().clone() for p in model.parameters()]


def test_a_second_backward_of_the_loss_is_said_with_its_line_and_the_loss_kept_once():
    run, losses, weights = _train("twice")
    found = [f for f in diagnose(run) if f.kind == "repeated_backward"]
    assert len(found) == 1 and found[0].first_step == 0 and found[0].severity == "warning"
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if text.strip() == "loss.backward()")
    assert found[0].evidence["where"] == f"test_repeated_backward.py:{line}"
    assert "twice over" in found[0].message and "doubled" in found[0].message
    torch.testing.assert_close(torch.as_tensor(run.loss, dtype=torch.float32), torch.tensor(losses), rtol=0, atol=0)
    _, _, unwatched = _train("twice", watched=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, unwatched))


def test_under_adam_it_is_info_the_step_being_scale_free():
    run, _, _ = _train("twice", torch.optim.Adam)
    f = next(f for f in diagnose(run) if f.kind == "repeated_backward")
    assert f.severity == "info" and "second backward" in f.message


def test_micro_batches_a_backward_after_a_clear_and_disjoint_inputs_are_no_finding():
    for how in ("micro", "cleared", "zeroed", "disjoint"):
        run, losses, _ = _train(how)
        assert not [f for f in diagnose(run) if f.kind == "repeated_backward"], how
        if how not in ("micro", "disjoint"):
            torch.testing.assert_close(torch.as_tensor(run.loss, dtype=torch.float32), torch.tensor(losses), rtol=0, atol=0)
