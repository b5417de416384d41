"""Jacobian spectra from jvp/vjp only, against the explicit Jacobian (torch.func.jacrev + svdvals)."""

import math

import pytest
import torch
from torch import nn

from gradwatch.probe import probe
from gradwatch.probe.spectra import func_ops, graph_ops, spectrum


def explicit_svdvals(f, x):
    j = torch.func.jacrev(f)(x)
    return torch.linalg.svdvals(j.reshape(f(x).numel(), x.numel()))


SMALL_LAYERS = {
    "linear_tanh": (lambda: nn.Sequential(nn.Linear(12, 9), nn.Tanh()), (12,)),
    "wide_to_narrow": (lambda: nn.Linear(20, 6), (20,)),
    "conv_relu": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()), (2, 5, 5)),
    "layernorm": (lambda: nn.LayerNorm(10), (10,)),
}


@pytest.mark.parametrize("name", sorted(SMALL_LAYERS))
def test_power_iteration_equals_svdvals_torch_func(name):
    factory, shape = SMALL_LAYERS[name]
    torch.manual_seed(0)
    f, x = factory().double(), torch.randn(shape, dtype=torch.float64)
    sv = explicit_svdvals(f, x)
    jvp, vjp, out = func_ops(f, x)
    s = spectrum(jvp, vjp, x, out.shape, iters=200, lanczos=10, tol=1e-10,
                 generator=torch.Generator().manual_seed(1))
    assert s.top == pytest.approx(float(sv[0]), rel=1e-3)
    k = min(x.numel(), out.numel())
    assert s.mean <= s.rms <= s.top * (1 + 1e-6)
    assert s.rms == pytest.approx(float(sv.pow(2).mean().sqrt()), rel=0.2)  # 8 probe vectors of ≤ 75 entries
    assert sv.numel() == k


def test_power_iteration_alone_converges_without_warm_start():
    torch.manual_seed(3)
    f, x = nn.Linear(15, 15).double(), torch.randn(15, dtype=torch.float64)
    sv = explicit_svdvals(f, x)
    jvp, vjp, out = func_ops(f, x)
    s = spectrum(jvp, vjp, x, out.shape, iters=500, lanczos=1, tol=1e-12)
    assert s.top == pytest.approx(float(sv[0]), rel=1e-3)


def test_graph_ops_match_func_ops_products():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(6, 7), nn.Tanh()).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = f(x)
    jvp_g, vjp_g = graph_ops(y, x)
    jvp_f, vjp_f, _ = func_ops(f, x.detach())
    v, u = torch.randn_like(x), torch.randn_like(y)
    torch.testing.assert_close(jvp_g(v), jvp_f(v))
    torch.testing.assert_close(vjp_g(u), vjp_f(u))


def test_probe_layer_spectra_equal_explicit_block_jacobians():
    """Inside a model, each layer's block (its input -> next layer's input) against jacrev of that
    block on the whole batch: top singular value to 1e-3, mean singular value by SLQ to a few %."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    r = probe(model, x, iters=300)
    blocks = [nn.Sequential(model[0], model[1]), nn.Sequential(model[2], model[3]), model[4]]
    h = x
    for layer, block in zip(r.layers, blocks):
        sv = explicit_svdvals(block, h)  # block-diagonal over the 8 samples
        assert layer.sigma_max == pytest.approx(float(sv[0]), rel=1e-3), layer.name
        k = min(h.shape[1], block(h).shape[1]) * h.shape[0]
        sv = sv[:k]  # the rest are zeros of the block-diagonal batch Jacobian
        assert layer.sigma_mean == pytest.approx(float(sv.mean()), rel=0.05), layer.name
        assert layer.sigma_rms == pytest.approx(float(sv.pow(2).mean().sqrt()), rel=0.05), layer.name
        h = block(h).detach()
    assert [x.jacobian_to for x in r.layers] == ["2", "4", "output"]
    assert r.gain["top"] == pytest.approx(math.prod(x.sigma_max for x in r.layers))


def test_slq_mean_singular_value_on_a_wide_layer():
    torch.manual_seed(0)
    lin = nn.Linear(300, 300).double()
    f = lambda z: torch.tanh(lin(z))  # noqa: E731
    x = 0.5 * torch.randn(300, dtype=torch.float64)
    sv = explicit_svdvals(f, x)
    jvp, vjp, out = func_ops(f, x)
    s = spectrum(jvp, vjp, x, out.shape, iters=0, lanczos=10, generator=torch.Generator().manual_seed(0))
    assert s.mean == pytest.approx(float(sv.mean()), rel=0.03)
    assert s.rms == pytest.approx(float(sv.pow(2).mean().sqrt()), rel=0.05)


def test_a_backward_that_is_not_differentiable_is_a_note_not_sigma_zero():
    """A custom autograd.Function with @once_differentiable: its Jacobian is not zero (σmax of the
    explicit Jacobian ≈ 0.95 here), so the probe must say it could not measure it."""
    class OnceTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * (1 - y * y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(OnceTanh.apply(self.a(x)))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    assert explicit_svdvals(lambda t: torch.tanh(model.a(t)), x)[0] > 0.5
    r = probe(model, x, iters=5)
    assert math.isnan(r.layers[0].sigma_max)
    assert any(n.startswith("a: no Jacobian") and "once_differentiable" in n for n in r.notes)


def test_a_zero_jacobian_is_still_measured_as_zero():
    x = torch.randn(3, 4, requires_grad=True)
    out = torch.round(x * 3)  # backward: zeros, not a function of the cotangent
    jvp, _ = graph_ops(out, x)
    assert not jvp(torch.ones(3, 4)).any()


def test_recurrent_layer_sigma_max_with_one_probe_vector():
    """A recurrent block's products are backwards through time; one SLQ probe (not 8) keeps σmax."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][-1])

    torch.manual_seed(0)
    model, x = Net(), torch.randn(20, 2, 3)
    r = probe(model, x, iters=30)
    assert r.layers[0].jacobian_to == "fc"
    xg = x.clone().requires_grad_()
    out = model.lstm(xg)[0][-1]
    rows = [torch.autograd.grad(out.flatten()[i], xg, retain_graph=True)[0].flatten() for i in range(out.numel())]
    sv = torch.linalg.svdvals(torch.stack(rows))  # the explicit Jacobian, one backward per output entry
    assert r.layers[0].sigma_max == pytest.approx(float(sv[0]), rel=0.03)
    calls = []
    jvp, vjp = graph_ops(out, xg)
    spectrum(lambda v: calls.append(1) or jvp(v), vjp, x, (2, 8), iters=0, lanczos=10, max_probes=1)
    assert len(calls) == 10  # 10 Lanczos steps from a single probe vector


def test_a_residual_models_gain_is_no_product_and_a_blow_up_cites_the_rms_factor():
    """A post-LN transformer's product of per-layer σmean read 2.8e-12 (its end-to-end Jacobian's
    mean singular value: 0.63): around skip connections no product over depth is the gain. And a
    20-layer tanh MLP at N(0, 1), grown ~1e8, was told of a mean σ of 0.95 per layer: the rms σ is
    the factor a random gradient's norm is scaled by, and its power over the depth is the growth."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    r = probe(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), torch.randn(4, 6, 16), iters=10)
    assert r.residual and all(math.isnan(v) for v in r.gain.values())
    assert "no product over depth" in r.summary_lines()[0]
    mlp = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(32, 32), nn.Tanh())], nn.Linear(32, 4))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
    r = probe(mlp, torch.randn(64, 32), iters=30)
    f = next(f for f in r.findings if f.kind == "exploding_gradient")
    rms = sorted(x.sigma_rms for x in r.layers)[len(r.layers) // 2]
    assert f"rms Jacobian singular value {rms:.3g}" in f.causes[0] and rms > 1.5
    worst = max(x.gain_to_top for x in r.layers)  # the growth over the hidden layers: about rms ** depth
    assert 0.1 < math.log(worst) / (len(r.layers) * math.log(rms)) < 10
