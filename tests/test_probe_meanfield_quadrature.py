"""The mean field's expectations over z ~ N(0, 1) against closed forms, for activations whose φ'² has a
kink or a jump (where a Gauss–Hermite rule, exact only for smooth integrands, read SELU's E[φ'²] 1% low)."""

import math

import pytest
from torch import nn

from gradwatch.probe import meanfield

PHI_M2 = 0.5 * math.erfc(2 / math.sqrt(2))  # Φ(−2)
TAIL_3 = 0.5 * math.erfc(3 / math.sqrt(2))  # P(z > 3)
LAMBDA, ALPHA = 1.0507009873554805, 1.6732632423543772  # torch's SELU constants


def test_kinked_derivatives_match_their_closed_forms():
    """E[φ'(z)²]: ELU 1/2 + e²Φ(−2) (φ' = eᶻ below 0); SELU λ²/2 + λ²α² e²Φ(−2); Hardswish
    E[((2z+3)/6)²; |z| < 3] + P(z > 3), with E[z²; |z| < 3] = P(|z| < 3) − 6φ(3)."""
    inner = 1 - 2 * TAIL_3
    second = inner - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi)
    closed = {nn.ELU(): 0.5 + math.e**2 * PHI_M2,
              nn.SELU(): LAMBDA**2 * (0.5 + ALPHA**2 * math.e**2 * PHI_M2),
              nn.Hardswish(): (4 * second + 9 * inner) / 36 + TAIL_3,
              nn.ReLU(): 0.5}
    for act, want in closed.items():
        assert meanfield.expect(act, 1.0)[1] == pytest.approx(want, rel=1e-5), act


def test_selu_keeps_unit_variance_and_its_depth_scale():
    """SELU's constants make q = 1 a fixed point at σ_w² = 1 (LeCun): E[selu(z)²] = 1, and χ₁ is the
    closed form above, ξ = 1/ln χ₁ ≈ 14.5 (the Gauss–Hermite rule read 16.8)."""
    assert meanfield.expect(nn.SELU(), 1.0)[0] == pytest.approx(1.0, abs=1e-6)
    chi = LAMBDA**2 * (0.5 + ALPHA**2 * math.e**2 * PHI_M2)
    mf = meanfield.predict(nn.SELU(), "selu", 1.0, 0.0, 10)
    assert mf.chi1 == pytest.approx(chi, rel=1e-4)
    assert mf.depth_scale == pytest.approx(1 / math.log(chi), rel=1e-3)


@pytest.mark.parametrize("q", [1e2, 1e4])
def test_saturated_tanh_spike_is_resolved(q):
    """At large q, tanh'(√q z)² is a spike of width 1/√q: E → (1/√q)·φ(0)·∫tanh'(x)²dx = 4/(3√(2πq))."""
    assert meanfield.expect(nn.Tanh(), q)[1] == pytest.approx(4 / (3 * math.sqrt(2 * math.pi * q)), rel=3e-3)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.ELU(), nn.SELU(), nn.GELU(), nn.Softplus(), nn.ReLU()])
def test_the_variance_map_needs_no_grid_refined_with_q(act):
    """q* iterates E[φ(√q z)²] on the fixed grid (refining it with q, with autograd, made an ELU net near
    He init take 20-30 s): up to q = 1e4 it agrees with the refined grid, and with ReLU's closed form
    q/2; at q = 1e6 within 1e-3 (tanh's 1 − tanh² is a spike of width 1/√q there)."""
    copy = meanfield._float64_copy(act)
    for q in (1e-6, 0.3, 1.0, 100.0, 1e4, 1e6):
        refined = meanfield.expect(act, q)[0]
        assert meanfield.second_moment(copy, q) == pytest.approx(refined, rel=1e-6 if q <= 1e4 else 1e-3), q
        if isinstance(act, nn.ReLU):
            assert refined == pytest.approx(q / 2, rel=1e-6)
