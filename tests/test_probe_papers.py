"""The probe against the papers' numbers: Glorot & Bengio 2010, He et al. 2015, Pascanu et al. 2013,
Schoenholz et al. 2017. Sizes are the papers' unless a comment says otherwise."""

import math

import pytest
import torch
from torch import nn

from gradwatch.probe import probe, probe_cell
from gradwatch.probe.meanfield import chi1, predict


# --- Glorot & Bengio 2010: 5 hidden tanh layers of 1000 units ---------------------------------

def glorot_net(init: str, width: int = 1000, classes: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    mods = []
    for i in range(6):
        lin = nn.Linear(width, width if i < 5 else classes)
        n_in, n_out = lin.in_features, lin.out_features
        # standard: U[-1/√n, 1/√n] (Var = 1/(3n)); normalized: U[-√6/√(n_in+n_out), +...] (Var = 2/(n_in+n_out))
        limit = 1 / math.sqrt(n_in) if init == "standard" else math.sqrt(6 / (n_in + n_out))
        nn.init.uniform_(lin.weight, -limit, limit)
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.Tanh()] if i < 5 else [lin]
    return nn.Sequential(*mods)


@pytest.fixture(scope="module")
def glorot():
    # Inputs of std 0.3: small inputs, as from the paper's Shapeset images; with unit-variance inputs
    # the first normalized-init layers sit deeper in tanh's curve (measured 0.53 -> 0.76 over depth).
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(32, 1000, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    loss = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
    return {init: probe(glorot_net(init), x, loss, iters=10) for init in ("standard", "normalized")}  # Lanczos only


def test_glorot_mean_jacobian_singular_value(glorot):
    """Paper: ≈ 0.5 (standard) vs ≈ 0.8 (normalized); a public re-run measured 0.49 vs 0.80."""
    for init, expected in (("standard", 0.49), ("normalized", 0.80)):
        hidden = glorot[init].layers[:5]
        mean = sum(x.sigma_mean for x in hidden) / 5
        assert mean == pytest.approx(expected, abs=0.05), (init, [x.sigma_mean for x in hidden])
        assert all(abs(x.sigma_mean - expected) < 0.1 for x in hidden), init


def test_glorot_backprop_gradient_shrinks_toward_input_only_under_standard_init(glorot):
    std = {init: [x.grad_out_std for x in r.layers[:5]] for init, r in glorot.items()}
    s = std["standard"]
    assert all(a < b for a, b in zip(s, s[1:])), s  # decreasing toward the input
    assert s[0] / s[-1] < 0.2, s  # about 1/√3 per layer
    n = std["normalized"]
    assert n[0] / n[-1] > 0.6, n  # roughly level
    # ∂L/∂W is reported too; the paper's point is that it can look level while ∂L/∂s is not
    assert all(math.isfinite(x.grad_w_norm) for x in glorot["standard"].layers)


# --- He et al. 2015: 30-layer ReLU net -----------------------------------------------------------

def relu_net(init: str, depth: int = 30, width: int = 256) -> nn.Sequential:
    # width 256 instead of the paper's conv layers: the variance argument holds at any width
    torch.manual_seed(0)
    mods = []
    for i in range(depth):
        lin = nn.Linear(width, width)
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)  # Var = 2/(n+n) = 1/n: halves the variance per ReLU
        else:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")  # Var = 2/n
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.ReLU()] if i < depth - 1 else [lin]
    return nn.Sequential(*mods)


@pytest.mark.parametrize("init,lo,hi", [("xavier", -17, -13), ("he", -2, 2)])
def test_he_output_std_ratio(init, lo, hi):
    """Xavier: output std / input std ≈ 2^-15 after 30 layers; He: ≈ 1."""
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    r = probe(relu_net(init), x, iters=0)
    log2_ratio = math.log2(r.output_std / r.input_std)
    assert lo <= log2_ratio <= hi, log2_ratio
    assert r.layers[-1].act_std == pytest.approx(r.output_std, rel=1e-6)
    if init == "xavier":
        assert r.verdict == "vanishing"
        f = next(f for f in r.findings if f.kind == "vanishing_gradient")
        assert f.first_step == 0 and f.layers[0] == "0"
        assert any("for w in (model[0].weight, model[2].weight" in m.code
                   and "kaiming_normal_(w, nonlinearity=\"relu\")" in m.code for m in f.remedies)
        assert r.mean_field.chi1 == pytest.approx(0.5, rel=0.02) and r.mean_field.too_deep
    else:
        assert r.verdict == "healthy" and not r.findings
        assert r.mean_field.chi1 == pytest.approx(1.0, rel=0.02) and not r.mean_field.too_deep


# --- Pascanu et al. 2013: tanh RNN, ‖∂L_T/∂h_k‖ against T−k -------------------------------------

def scaled_orthogonal_rnn(radius: float, hidden: int = 64) -> nn.RNN:
    """W_hh = radius · Q (Q orthogonal: a normal matrix, so its spectral norm = spectral radius),
    zero biases; with inputs of 1e-6 the states stay near 0 where tanh' = 1, so ∂h_i/∂h_{i-1} = W_hh
    and the per-step factor is exactly the radius."""
    torch.manual_seed(0)
    rnn = nn.RNN(8, hidden, batch_first=True)
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(radius * q)
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    return rnn


@pytest.mark.parametrize("radius,steps", [(0.9, 80), (1.5, 25)])
def test_pascanu_geometric_rate_equals_spectral_radius(radius, steps):
    rnn = scaled_orthogonal_rnn(radius)
    x = 1e-6 * torch.randn(4, steps, 8, generator=torch.Generator().manual_seed(0))
    r = probe(rnn, x).recurrent[0]
    assert r.rate == pytest.approx(radius, rel=0.1)
    assert r.spectral_radius == pytest.approx(radius, rel=1e-4)
    assert r.spectral_norm == pytest.approx(radius, rel=1e-4) and r.bound == 1.0
    profile = torch.tensor(r.profile)
    ratios = profile[1:] / profile[:-1]
    assert torch.all((ratios - radius).abs() < 0.1 * radius)  # geometric at every step, not only on average
    # BPTT horizon: first T−k beyond 1e-3 (decay) or 1e3 (growth) of the value at T
    assert r.horizon == math.ceil(math.log(1e-3 if radius < 1 else 1e3) / math.log(radius))
    assert r.direction == ("vanishing" if radius < 1 else "exploding")


def test_pascanu_custom_step_function():
    rnn = scaled_orthogonal_rnn(0.9)
    w, u = rnn.weight_hh_l0.detach(), rnn.weight_ih_l0.detach()
    xs = 1e-6 * torch.randn(40, 4, 8, generator=torch.Generator().manual_seed(0))
    r = probe_cell(lambda x, h: torch.tanh(x @ u.T + h @ w.T), xs, torch.zeros(4, 64), w_hh=w)
    assert r.rate == pytest.approx(0.9, rel=0.01)
    assert r.horizon is None and r.direction == "within range"  # 0.9^40 ≈ 0.015 > 1e-3


# --- Schoenholz et al. 2017: mean field --------------------------------------------------------

def test_meanfield_critical_points():
    assert chi1(nn.Tanh(), 1.0, 0.0)[0] == pytest.approx(1.0, abs=1e-6)
    assert chi1(nn.ReLU(), 2.0, 0.0)[0] == pytest.approx(1.0, abs=1e-6)
    assert chi1(nn.ReLU(), 1.0, 0.0)[0] == pytest.approx(0.5, abs=1e-6)
    assert chi1(nn.Tanh(), 0.8, 0.05)[0] < 1 < chi1(nn.Tanh(), 1.5, 0.0)[0]
    mf = predict(nn.Tanh(), "tanh", 0.8, 0.05, depth=30)
    assert mf.depth_scale == pytest.approx(-1 / math.log(mf.chi1)) and mf.too_deep  # 30 > 6ξ ≈ 13.8
    assert not predict(nn.Tanh(), "tanh", 1.0, 0.0, depth=500).too_deep


def tanh_mlp(sw2: float, sb2: float, depth: int = 12, width: int = 500) -> nn.Sequential:
    torch.manual_seed(1)
    mods = []
    for i in range(depth):
        lin = nn.Linear(width, width if i < depth - 1 else 10)
        nn.init.normal_(lin.weight, std=math.sqrt(sw2 / width))
        nn.init.normal_(lin.bias, std=math.sqrt(sb2))
        mods += [lin, nn.Tanh()] if i < depth - 1 else [lin]
    return nn.Sequential(*mods)


@pytest.mark.parametrize("sw2,sb2", [(0.8, 0.05), (1.5, 0.0), (1.0, 0.0)])
def test_meanfield_chi1_matches_measured_gradient_ratio(sw2, sb2):
    """‖∂L/∂s_l‖² / ‖∂L/∂s_{l+1}‖² = χ₁ on a wide random tanh MLP. Inputs drawn from the fixed-point
    distribution φ(√q* z) so every layer sits at q*; random-label cross-entropy so the top gradient
    is independent of the weights (the theory's gradient-independence assumption)."""
    expected, q = chi1(nn.Tanh(), sw2, sb2)
    g = torch.Generator().manual_seed(0)
    x = torch.tanh(math.sqrt(q) * torch.randn(64, 500, generator=g)) if q > 0 else 0.01 * torch.randn(64, 500, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    r = probe(tanh_mlp(sw2, sb2), x, lambda out: nn.functional.cross_entropy(out, y), iters=0)
    assert r.mean_field.sigma_w2 == pytest.approx(sw2, rel=0.02)  # read from the weights
    assert r.mean_field.chi1 == pytest.approx(expected, rel=0.01)
    assert r.chi_measured == pytest.approx(expected, rel=0.1)
    per_layer = [x.grad_ratio for x in r.layers[:-1]]
    assert all(abs(v / expected - 1) < 0.1 for v in per_layer), per_layer


def test_meanfield_with_dropout_in_train_mode():
    """Inverted dropout (keep ρ) after every hidden ReLU layer multiplies the squared gradient by 1/ρ per
    layer in train mode: χ₁ = σ_w²/(2ρ) for ReLU (Schoenholz et al. 2017, section 5). The prediction
    ignored it (said χ₁ = 1 for He init with p = 0.3; measured 1.43 per layer). Eval mode: no dropout."""
    torch.manual_seed(0)
    mods = []
    for _ in range(6):
        lin = nn.Linear(400, 400)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.ReLU(), nn.Dropout(0.3)]
    model = nn.Sequential(*mods, nn.Linear(400, 400))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 400, generator=g), torch.randint(0, 400, (64,), generator=g)
    loss = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731  independent of the weights
    r = probe(model, x, loss, iters=0)
    sw2 = r.mean_field.sigma_w2
    assert r.mean_field.keep == pytest.approx(0.7)
    assert r.mean_field.chi1 == pytest.approx(sw2 / (2 * 0.7), rel=1e-3)
    assert r.chi_measured == pytest.approx(r.mean_field.chi1, rel=0.1)
    assert "dropout 0.3" in r.summary_lines()[1]
    e = probe(model.eval(), x, loss, iters=0)
    assert e.mean_field.keep == 1.0 and e.mean_field.chi1 == pytest.approx(sw2 / 2, rel=1e-3)
    assert e.chi_measured == pytest.approx(e.mean_field.chi1, rel=0.1)


def test_relu_variance_map_is_linear_so_q_star_is_decided_not_iterated():
    """ReLU, σ_b² = 0: q ← (σ_w²/2) q. He init read from real weights has σ_w² = 2 ± 1e-3; the fixed-point
    iteration crept for 5000 steps (about a second) and reported q* = 3.52 on a 30-layer He MLP."""
    from gradwatch.probe.meanfield import q_star

    assert q_star(nn.ReLU(), 2.003, 0.0) == 1.0  # every q is fixed (to 1% per layer): the input's
    assert q_star(nn.ReLU(), 1.9, 0.0) == 0.0
    assert q_star(nn.ReLU(), 2.5, 0.0) == math.inf
    assert q_star(nn.LeakyReLU(0.1), 2 / 1.01, 0.0) == 1.0  # E[φ²] = (1 + 0.01)/2
    assert q_star(nn.ReLU(), 2.0, 0.1) == math.inf  # a bias on a marginal linear map: grows
    assert q_star(nn.Tanh(), 1.5, 0.0) == pytest.approx(chi1(nn.Tanh(), 1.5, 0.0)[1])  # tanh still iterated
    assert q_star(nn.ReLU(), 1.0, 0.1) == pytest.approx(0.2)  # q = q/2 + 0.1


def test_default_loss_gain_to_the_input_matches_the_mean_field_closed_form():
    """A 30-layer tanh MLP at σ_w² = 0.8, 300 wide up to its output (an autoencoder's or a language
    model's wide readout), from standard normal inputs: the closed form ∏ √χ_l with χ_l = σ_w²
    E[tanh'(√q_l z)²] along the variance map's transient q_l. The default used to be ½Σy²/B, whose
    ∂L/∂y = y = W_L h depends on the weights (‖W_Lᵀ W_L h‖ ≈ √2 ‖W_Lᵀ u‖ for a square W_L, and more
    below): 7.7× the closed form at depth 50. The random projection's ∂L/∂y does not."""
    from gradwatch.probe.core import sumsq_loss
    from gradwatch.probe.meanfield import expect

    sw2, depth = 0.8, 30
    x = torch.randn(32, 300, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    lins = [nn.Linear(300, 300) for _ in range(depth)]
    for lin in lins:
        nn.init.normal_(lin.weight, std=math.sqrt(sw2 / 300))
        nn.init.zeros_(lin.bias)
    model = nn.Sequential(*[m for lin in lins[:-1] for m in (lin, nn.Tanh())], lins[-1])
    q, gain = sw2 * float(x.pow(2).mean()), 1.0
    for _ in range(depth - 1):  # ∂L/∂s_l = φ'(s_l) ⊙ W_{l+1}ᵀ ∂L/∂s_{l+1}, s_l of variance q_l
        phi2, dphi2 = expect(nn.Tanh(), q)
        gain *= math.sqrt(sw2 * dphi2)
        q = sw2 * phi2
    r = probe(model, x, iters=0)
    assert r.layers[0].gain_to_top == pytest.approx(gain, rel=0.3)
    assert probe(model, x, sumsq_loss, iters=0).layers[0].gain_to_top > 3 * gain
