"""Every recorded statistic equals an independent float64 recomputation from the same training."""

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.collect.layers import RECURRENT, activation_name
from models import FAMILIES, train

STEPS = 4


def _own_params(module):
    return [p for p in module._parameters.values() if p is not None and p.requires_grad]


class Reference:
    """Recomputes the statistics in float64 with numpy, from hooks of its own."""

    def __init__(self, model):
        self.model = model
        self.grad, self.gmax, self.weight, self.ratio = {}, {}, {}, {}
        self.act = {}
        self._before = None
        for name, module in model.named_modules():
            if activation_name(module):
                module.register_forward_hook(self._act_hook(name))

    def _act_hook(self, name):
        def hook(module, args, out):
            y = out.detach().double().numpy()
            unit_axis = 1 if y.ndim in (4, 5) else y.ndim - 1
            units = np.moveaxis(y, unit_axis, 0).reshape(y.shape[unit_axis], -1)
            dead = float(np.mean([np.all(u == 0) for u in units]))
            act = activation_name(module)
            sat = {"sigmoid": np.mean((y <= 0.01) | (y >= 0.99)), "tanh": np.mean(np.abs(y) >= 0.99)}.get(act, np.nan)
            self.act[(self.step, name)] = (y.mean(), y.std(ddof=1), sat, dead)
        return hook

    def after_backward(self, step, model):
        self.step = step
        for name, module in model.named_modules():
            params = _own_params(module)
            if not params or not any(p.grad is not None for p in params):
                continue
            grads = np.concatenate([p.grad.double().numpy().ravel() for p in params if p.grad is not None])
            weights = np.concatenate([p.detach().double().numpy().ravel() for p in params])
            self.grad[(step, name)] = np.linalg.norm(grads)
            self.gmax[(step, name)] = np.abs(grads).max()
            self.weight[(step, name)] = np.linalg.norm(weights)
        self._before = {n: p.detach().double().clone() for n, p in model.named_parameters()}

    def after_step(self, step, model):
        for name, module in model.named_modules():
            params = [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]
            if not params:
                continue
            prefix = f"{name}." if name else ""
            delta = np.sqrt(sum(((p.detach().double() - self._before[prefix + n]) ** 2).sum().item() for n, p in params))
            self.ratio[(step, name)] = delta / self.weight[(step, name)]


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_match_float64_reference(family):
    import gradwatch
    from models import make

    model, batch, loss_fn = make(family)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Reference(model)
    ref.step = 0
    watch = gradwatch.watch(model, opt, sample_every=1)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        ref.step = step
        x, y = batch(g)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        ref.after_backward(step, model)
        opt.step()
        ref.after_step(step, model)
    series = watch.series()
    watch.detach()

    checked = 0
    for (step, name), expected in ref.grad.items():
        row = int(np.searchsorted(series.steps, step))
        col = series.column(name)
        for metric, table in (("grad_norm", ref.grad), ("grad_max", ref.gmax),
                              ("weight_norm", ref.weight), ("update_ratio", ref.ratio)):
            assert series.metrics[metric][row, col] == pytest.approx(table[(step, name)], rel=1e-4, abs=1e-7), (metric, name, step)
            checked += 1
        assert series.metrics["nonfinite"][row, col] == 0
    for (step, name), (mean, std, sat, dead) in ref.act.items():
        row, col = int(np.searchsorted(series.steps, step)), series.column(name)
        got = [series.metrics[m][row, col] for m in ("act_mean", "act_std", "saturated", "dead")]
        assert got[0] == pytest.approx(mean, abs=1e-5) and got[1] == pytest.approx(std, rel=1e-4)
        assert (np.isnan(sat) and np.isnan(got[2])) or got[2] == pytest.approx(sat, abs=1e-6)
        assert got[3] == pytest.approx(dead, abs=1e-6)
        checked += 1
    assert checked >= STEPS * 4


def test_grad_out_rms_is_the_pre_activation_gradient():
    """For a Linear layer grad_out_rms is the RMS of dL/ds, s = Wx + b (Glorot & Bengio's quantity)."""
    import gradwatch

    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(7, 1))
    x = torch.randn(9, 5)
    watch = gradwatch.watch(model, sample_every=1)
    out = model(x).pow(2).sum()
    out.backward()
    series = watch.series()
    watch.detach()
    s = lin(x)
    (g,) = torch.autograd.grad(model[2](model[1](s)).pow(2).sum(), s)
    expected = g.double().pow(2).mean().sqrt().item()
    assert series.metrics["grad_out_rms"][0, series.column("0")] == pytest.approx(expected, rel=1e-5)


def test_recurrent_time_profile_matches_input_gradient():
    import gradwatch

    torch.manual_seed(0)
    rnn = nn.RNN(3, 6, batch_first=True)
    x = torch.randn(2, 9, 3)
    watch = gradwatch.watch(rnn, sample_every=1)
    out, _ = rnn(x)
    out[:, -1].sum().backward()
    series = watch.series()
    watch.detach()
    x2 = x.clone().requires_grad_()
    rnn(x2)[0][:, -1].sum().backward()
    expected = x2.grad.double().norm(dim=(0, 2)).numpy()
    steps, table = series.time_profiles[series.layer_names()[0]]
    np.testing.assert_allclose(table[0], expected, rtol=1e-5)
    assert isinstance(rnn, RECURRENT)


def test_other_libraries_activation_modules_are_activations():
    """Hugging Face's GELU is its own module class (GELUActivation): before, GPT-2 reported that
    no activation module was watched."""
    class GELUActivation(nn.Module):
        def forward(self, x):
            return nn.functional.gelu(x)

    class GatedBlock(nn.Module):  # a name that is not an activation's: not taken for one
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(nn.Linear(4, 8), GELUActivation(), nn.Linear(8, 8), GatedBlock(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from gradwatch import watch as gw_watch

    with gw_watch(model, opt, sample_every=1) as watch:
        opt.zero_grad()
        model(torch.randn(16, 4)).sum().backward()
        opt.step()
        series = watch.series()
    acts = {l.name: l.activation for l in series.layers if l.role == "activation"}
    assert acts == {"1": "gelu"}
    assert np.isfinite(series.metrics["act_mean"][0, series.column("1")])


def test_a_validation_forward_left_with_gradients_on_is_not_the_steps_activations():
    """model.eval(); val_loss = loss_fn(model(x_val), y_val) without torch.no_grad(), between two
    steps: its activations (other data, here 10x the scale: saturated sigmoids) were averaged into
    the next sampled step's. Only forwards a backward reaches count; a frozen layer's activations,
    which no backward reaches, are still recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}
    hooks = [model[i].register_forward_hook(lambda m, a, y, i=i: seen.setdefault(i, y.detach()) if m.training else None)
             for i in (1, 3)]
    with gradwatch.watch(model, opt, sample_every=2, warn=False) as w:
        for step in range(3):
            model.train()
            if step == 2:
                seen.clear()
            x = torch.randn(32, 6)
            loss = nn.functional.cross_entropy(model(x), x[:, :2].argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.eval()
            model(torch.randn(64, 6) * 10).sum()  # validation, gradients on, no backward
        run = w.series()
    for h in hooks:
        h.remove()
    assert run.metrics["act_mean"][2, run.column("3")] == pytest.approx(seen[3].mean().item(), rel=1e-6)
    assert np.isfinite(run.metrics["act_mean"][2, run.column("1")])  # (with the validation's: no backward tells)
    assert run.metrics["saturated"][2, run.column("3")] == pytest.approx(
        ((seen[3] < 0.01) | (seen[3] > 0.99)).float().mean().item())
