"""Activation statistics of small outputs taken together: a sampled step of a model of many tiny
layers paid ~10 kernels (~90 µs on the CPU) per activation output. Each output's statistics must
stay bitwise those of the output alone, and be those of the output as its activation gave it."""

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.collect.stats import activation_stats_stacked
from test_watch_overhead import CountOps


def _alone(y: torch.Tensor, activation: str) -> list[float]:
    """One output's statistics by torch's own reductions over the whole tensor (docs/statistics.md)."""
    y = y.float()
    mean = y.mean()
    std = torch.linalg.vector_norm(y - mean) / math.sqrt(y.numel() - 1) if y.numel() > 1 else torch.zeros(())
    saturated = math.nan
    if activation in ("Tanh", "Sigmoid"):  # within 1% of the range from an asymptote
        low, high = (-1.0, 1.0) if activation == "Tanh" else (0.0, 1.0)
        saturated = ((y <= low + 0.01 * max(-low, high)) | (y >= high - 0.01 * max(-low, high))).float().mean().item()
    dead = math.nan
    d = 1 if y.dim() in (4, 5) else y.dim() - 1  # units: channels, else features
    if y.dim() >= 2 and y.numel() // y.shape[d] >= 8:
        alive = (y != 0).movedim(d, 0).reshape(y.shape[d], -1).any(dim=1)
        dead = (1.0 - alive.float().mean()).item()
    return [mean.item(), std.item(), saturated, dead]


def _same(a: list[float], b: list[float]) -> bool:
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("shape", [(), (1,), (5,), (32, 8), (7, 3, 5), (2, 4, 6, 6), (8, 4, 3, 3, 3), (256, 512)])
@pytest.mark.parametrize("activation", ["ReLU", "Tanh", "Sigmoid"])
def test_stacked_statistics_are_each_outputs_own_bitwise(shape, activation):
    torch.manual_seed(0)
    fn = {"ReLU": torch.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid}[activation]
    ys = [fn(torch.randn(shape) * scale + 0.3) for scale in (1.0, 1e-3, 1e4)]
    rows = activation_stats_stacked(torch.stack(ys), activation.lower()).tolist()
    for y, row in zip(ys, rows):
        assert _same(row, _alone(y, activation))
        if y.numel() > 1:  # and the std is torch's unbiased one, to float32 summation's rounding
            assert row[1] == pytest.approx(y.double().std().item(), rel=1e-4, abs=1e-30)


def _tiny(n: int = 40) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    return nn.Sequential(*layers)


def test_small_outputs_cost_a_few_kernels_not_ten_each():
    """40 Tanh outputs of 8x4 in a sampled step: one mean over all of them (was one each)."""
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    kept = []
    hooks = [m.register_forward_hook(lambda m, a, y: kept.append(y.detach().clone())) for m in model[1::2]]
    with gradwatch.watch(model, opt, warn=False, status=False) as watch:
        with CountOps() as counted:  # step 0: sampled
            opt.zero_grad()
            model(x).square().mean().backward()
        opt.step()
        run = watch.series()
    for h in hooks:
        h.remove()
    # the loss's own, then saturated fraction, mean and dead units, each one kernel for all (was 1 + 3 x 40)
    assert counted.ops["mean"] == 4
    for k, y in enumerate(kept):
        col = run.column(str(2 * k + 1))
        recorded = [run.metrics[m][0, col] for m in ("act_mean", "act_std", "saturated", "dead")]
        assert _same(recorded, _alone(y, "Tanh"))


def test_an_output_changed_in_place_after_its_activation_keeps_its_own_statistics():
    """GELU keeps its input for backward, so the loop may scale its output in place: the statistics
    are of the output as the activation gave it, not as the backward finds it."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))
            self.act = nn.ModuleList(nn.GELU() for _ in range(5))

        def forward(self, x):
            for lin, act in zip(self.lin, self.act):
                x = act(lin(x))
                x.mul_(3.0)
            return x

    torch.manual_seed(0)
    model = Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []
    hooks = [m.register_forward_hook(lambda m, a, y: kept.append(y.detach().clone())) for m in model.act]
    with gradwatch.watch(model, opt, warn=False, status=False) as watch:
        opt.zero_grad()
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
        run = watch.series()
    for h in hooks:
        h.remove()
    for k, y in enumerate(kept):
        col = run.column(f"act.{k}")
        assert run.metrics["act_mean"][0, col] == y.mean().item()
        assert run.metrics["act_mean"][0, col] != (3 * y).mean().item()


def test_forwards_no_backward_follows_hold_no_copies():
    """A validation loop left with gradients on, between steps, before a sampled one: each small output
    was copied and held to the next backward (1000 forwards of a 10x64 MLP: 156 MiB, and 537 ms of
    statistics taken for nothing); now a copy goes with its forward's graph. The training forward's
    statistics stay those of its own outputs."""
    import gc

    torch.manual_seed(0)
    model = _tiny(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    gc.disable()  # the copies must go without the cycle collector (a gc-less trainer)
    try:
        with gradwatch.watch(model, opt, sample_every=10, warn=False, status=False) as w:
            for _ in range(10):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
            for _ in range(50):  # the next step is sampled: its hooks are armed
                model(torch.randn(8, 4))
            hooks = w._sampled_hooks
            alive = [r for r in hooks._todo if r() is not None]
            assert len(alive) <= 10, len(alive)  # at most the last forward's, still referenced
            outputs = []
            handles = [m.register_forward_hook(lambda m, a, y: outputs.append(y.detach().clone()))
                       for m in model[1::2]]
            model(x).square().mean().backward()
            opt.step()
            for h in handles:
                h.remove()
            run = w.series()
    finally:
        gc.enable()
    for k, y in enumerate(outputs):
        col = run.column(str(2 * k + 1))
        recorded = [run.metrics[m][10, col] for m in ("act_mean", "act_std", "saturated", "dead")]
        assert _same(recorded, _alone(y, "Tanh"))
