"""Small gradients are read together after backward, not one kernel each in their hooks; the values
are bitwise those torch gives each tensor alone. Flushes build their rows column-wise."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.collect.stats import MISSING
from gradwatch.collect.watch import SMALL_GRAD


class Net(nn.Module):
    """Small parameters of several shapes (and bf16), one too big to be small, a small sparse
    embedding and an unused layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, sparse=True)
        self.big = nn.Linear(8, SMALL_GRAD // 8 + 8)
        self.down = nn.Linear(SMALL_GRAD // 8 + 8, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.act = nn.Tanh()
        self.low = nn.Linear(8, 8).to(torch.bfloat16)
        self.unused = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, idx):
        h = self.down(torch.relu(self.big(self.emb(idx).mean(1))))
        for block in self.blocks:
            h = self.act(block(h))
        h = self.act(h + self.low(h.bfloat16()).float())
        return self.out(h)


def _reference(params):
    """Per parameter: torch's own norm, max |g| and weight norm, one tensor at a time."""
    grads = [None if p.grad is None else (p.grad.coalesce().values() if p.grad.is_sparse else p.grad)
             for p in params]
    grad = [MISSING if g is None else torch.linalg.vector_norm(g, dtype=torch.float32).item() for g in grads]
    gmax = [MISSING if g is None else g.abs().max().float().item() for g in grads]
    weight = [MISSING if g is None else torch.linalg.vector_norm(p.detach(), dtype=torch.float32).item()
              for p, g in zip(params, grads)]
    return grad, gmax, weight


def test_small_gradients_equal_torchs_own_norms_bitwise():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.watch(model, opt, sample_every=2, flush_every=100, warn=False, status=False)
    params = watch._params
    assert any(p.numel() > SMALL_GRAD for p in params) and any(p.numel() <= SMALL_GRAD for p in params)
    expected = []
    for _ in range(4):
        opt.zero_grad()
        for _ in range(2):  # accumulation: the norms are those of the summed gradient
            idx = torch.randint(0, 20, (16, 5))
            loss = nn.functional.cross_entropy(model(idx), torch.randint(0, 3, (16,)))
            loss.backward()
        expected.append(_reference(params))
        opt.step()
    records = watch._pending
    assert [r.sampled for r in records] == [True, False, True, False]
    for rec, (grad, gmax, weight) in zip(records, expected):
        assert rec.grad.tolist() == grad  # bitwise (float32 values, compared as Python floats)
        if rec.sampled:
            assert rec.grad_max.tolist() == gmax
            assert rec.weight.tolist() == weight
    unused = [i for i, p in enumerate(params) if any(p is q for q in model.unused.parameters())]
    assert unused and all(records[0].grad[i] == MISSING for i in unused)
    watch.detach()


class CountNorms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.norms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.norms += func.overloadpacket is torch.ops.aten.linalg_vector_norm
        return func(*args, **(kwargs or {}))


def test_small_gradients_cost_a_few_kernels_not_one_each():
    """A model of many tiny layers paid a norm kernel per tensor per step in its hook (40-50 µs per
    tensor per step measured on a 2000-tensor MLP): now a norm per shape."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.watch(model, opt, warn=False, status=False)
    x = torch.randn(8, 4)
    counts = []
    for _ in range(3):  # step 0 sampled (grad, max |g| and weight norms), then plain steps
        opt.zero_grad()
        with CountNorms() as mode:
            model(x).square().mean().backward()
        counts.append(mode.norms)
        opt.step()
    watch.detach()
    assert counts[1] == counts[2] == 2  # one per shape: 4x4 weights, 4-biases (was 100)
    # sampled: max |g| and weight norms too (was 300), and each layer's ∂L/∂output RMS
    assert counts[0] == 3 * 2 + 50


def test_flush_rows_with_modules_called_twice():
    """Stored activation statistics and ∂L/∂output of a module called twice per step are the mean
    over its calls, as computed one by one on the device."""
    torch.manual_seed(0)
    lin, act = nn.Linear(6, 6), nn.Tanh()
    model = nn.Sequential(lin, act)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats, grads = [], []
    act.register_forward_hook(lambda m, a, y: stats.append(y.detach()))

    def keep_grad(module, args, y):
        y.register_hook(grads.append)
    lin.register_forward_hook(keep_grad)
    watch = gradwatch.watch(model, opt, warn=False, status=False)
    x = torch.randn(16, 6)
    loss = (model(model(x)) ** 2).mean()
    loss.backward()
    opt.step()
    run = watch.series()
    watch.detach()
    from gradwatch.collect.stats import activation_stats, rms

    want = ((activation_stats(stats[0], "tanh") + activation_stats(stats[1], "tanh")) / 2).tolist()
    got = [run.metrics[c][0, run.column("1")] for c in ("act_mean", "act_std", "saturated", "dead")]
    assert got == want
    want_rms = ((rms(grads[0]) + rms(grads[1])) / 2).item()
    assert run.metrics["grad_out_rms"][0, run.column("0")] == want_rms
    assert math.isnan(run.metrics["act_mean"][0, run.column("0")])  # not an activation: not recorded
    assert np.isfinite(run.metrics["grad_norm"][0, run.column("0")])


def test_backward_with_create_graph():
    """Gradients with a graph of their own (backward(create_graph=True), as higher-order methods
    call it) stopped training: vector_norm's out= refuses inputs that require grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, SMALL_GRAD // 4 + 4), nn.Tanh(), nn.Linear(SMALL_GRAD // 4 + 4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gradwatch.watch(model, opt, warn=False, status=False)
    want = []
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward(create_graph=True)
        want.append([torch.linalg.vector_norm(torch.cat([p.grad.detach().flatten() for p in layer.parameters()])).item()
                     for layer in (model[0], model[2])])
        opt.step()
    run = watch.series()
    watch.detach()
    got = run.metrics["grad_norm"][:, [run.column("0"), run.column("2")]]
    assert not watch._norm_buf.requires_grad
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_float64_model_is_watched_and_trains_as_unwatched():
    """vector_norm refuses to narrow float64 to float32: watching a float64 model crashed its first
    backward. Its norms are now taken in float64 and stored as float32, small and large alike."""
    import gradwatch as gw

    def train(watch: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 1)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = gw.watch(model, opt, warn=False) if watch else None
        for _ in range(11):
            opt.zero_grad()
            model(torch.randn(5, 4, dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
        series = w.series() if w else None
        if w:
            w.detach()
        return model, series

    plain, _ = train(False)
    watched, series = train(True)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    for name in ("0", "2"):  # 40 entries (read after backward) and 1152 (in its hook)
        layer = getattr(watched, name)
        expected = torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()]).norm().item()
        assert series.metrics["grad_norm"][-1, series.column(name)] == pytest.approx(expected, rel=1e-6)


def test_gradients_of_weights_toggled_off_for_another_backward_are_kept():
    """A GAN toggles the generator's weights off (requires_grad=False) for the discriminator's
    backward: with no watched weight requiring grad, the watch took the gradients for cleared and
    dropped the generator's."""
    import gradwatch as gw

    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with gw.watch(gen, opt, warn=False) as w:
        for _ in range(3):
            opt.zero_grad()
            disc(gen(x)).mean().backward()
            gen.requires_grad_(False)
            disc(x).mean().backward()  # the discriminator's own, the generator toggled off
            gen.requires_grad_(True)
            opt.step()
        series = w.series()
    expected = torch.cat([gen.weight.grad.flatten(), gen.bias.grad.flatten()]).norm().item()
    assert series.metrics["grad_norm"][-1, 0] == pytest.approx(expected, rel=1e-6)
