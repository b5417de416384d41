"""Loops as users write them, checked against torch's own numbers: a param group added mid-run, a
model cast to float64 mid-run."""

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in module.parameters()])


def test_a_param_group_added_between_steps_is_recorded_from_its_first_step():
    """The head, frozen, is unfrozen and given to the optimizer before step 4: its gradient and
    update are step 4's. (With the last step's update window kept open for a partner, the group
    waited for the next step: step 4 had none.)"""
    torch.manual_seed(0)
    model, x, y = _mlp(), torch.randn(32, 8), torch.randint(0, 3, (32,))
    model[4].requires_grad_(False)
    opt = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.1)
    grads, ratios = [], []
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for step in range(7):
            if step == 4:
                model[4].requires_grad_(True)
                opt.add_param_group({"params": model[4].parameters(), "lr": 0.05})
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            before = _flat(model[4])
            grads.append(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[4].parameters()])).item()
                         if model[4].weight.grad is not None else np.nan)
            opt.step()
            ratios.append((torch.linalg.vector_norm(_flat(model[4]) - before) / torch.linalg.vector_norm(before)).item())
        run = watch.series()
    column = run.column("4")
    np.testing.assert_allclose(run.metrics["grad_norm"][4:, column], grads[4:], rtol=1e-5)
    np.testing.assert_allclose(run.metrics["update_ratio"][4:, column], ratios[4:], rtol=1e-4)


def test_a_model_cast_to_float64_mid_run_has_its_updates_measured_in_float64():
    """model.double() after three steps: the weights before each update were copied into the
    float32 buffers of the first steps, rounded, and a tiny update (lr 1e-6) read 5.1e-8 for 4.3e-8."""
    torch.manual_seed(0)
    model, x, y = _mlp(), torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    ratios = []
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        for step in range(6):
            if step == 3:
                model.double()
            loss = nn.functional.cross_entropy(model(x.to(model[0].weight.dtype)), y)
            opt.zero_grad()
            loss.backward()
            before = _flat(model[2])
            opt.step()
            ratios.append((torch.linalg.vector_norm(_flat(model[2]) - before) / torch.linalg.vector_norm(before)).item())
        run = watch.series()
    np.testing.assert_allclose(run.metrics["update_ratio"][:, run.column("2")], ratios, rtol=1e-4)


def test_an_optimizer_of_another_model_is_a_config_error():
    """gw.watch(model, optimizer_of_another_model): its steps defined the steps, and with the real
    optimizer taken for a partner, nothing was recorded, silently."""
    model, other = _mlp(), nn.Linear(3, 3)
    with pytest.raises(gw.GradwatchError, match="holds none of Sequential's parameters"):
        gw.watch(model, torch.optim.SGD(other.parameters(), lr=0.1))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    frozen_backbone = _mlp()
    frozen_backbone[0].requires_grad_(False)  # an optimizer for part of the model is one for it
    gw.watch(frozen_backbone, torch.optim.SGD(frozen_backbone[4].parameters(), lr=0.1), warn=False).detach()
