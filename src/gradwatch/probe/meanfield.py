"""Mean-field theory of signal propagation in wide random MLPs (Poole et al. 2016; Schoenholz et al. 2017).

For a fully connected net with weights W_ij ~ (0, σ_w²/n_in), biases ~ (0, σ_b²) and an elementwise
nonlinearity φ, the pre-activation variance q follows the variance map

    q_{l+1} = σ_w² E_z[φ(√q_l z)²] + σ_b²,    z ~ N(0, 1),

whose fixed point is q*. At q*, the squared gradient norm shrinks or grows by the factor

    χ₁ = σ_w² E_z[φ'(√q* z)²]

per layer on its way back (χ₁ < 1 vanishing, = 1 critical, > 1 exploding). Gradients change by e
over ξ = 1 / |ln χ₁| layers; Schoenholz et al. found networks deeper than about 6ξ untrainable
(their ξ_c equals this ξ in the ordered phase, where the correlation fixed point is c* = 1).
Critical points: tanh at σ_w² = 1, σ_b² = 0; ReLU at σ_w² = 2 (any σ_b² = 0 variance).

Expectations over z are a midpoint rule on [−10, 10] (step 0.005, finer at large q: no node at 0, so
a kink or jump there, ReLU's or SELU's, falls on a cell edge). Gauss–Hermite (100 nodes) assumed a
smooth integrand: it read E[φ'²] 1% low for SELU (1.0615 against the closed form 1.0716), 0.5% for
ELU, whose φ'² has a kink at 0, and 8× low for tanh at q = 100, whose φ'² is a spike of width 1/√q
between its nodes. φ and φ' are taken from the activation module itself with autograd in float64, so
every elementwise activation torch has is supported without a table.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

Z_MAX = 10.0  # P(|z| > 10) ~ 1e-23
STEP = 0.005  # grid step in z: a kink off the cell edges costs O(STEP²), a jump O(STEP)
MAX_NODES = 2**18
TRAINABLE_DEPTHS = 6.0  # Schoenholz et al. 2017: trainable when depth ≲ 6 ξ
Q_TINY = 1e-12  # χ₁ at q* = 0 is the limit q -> 0+


def _float64_copy(act: nn.Module) -> nn.Module:
    """A float64, out-of-place copy of the activation, in eval mode: `.double()` and `inplace` would
    otherwise change the user's module (a PReLU left in float64, an in-place op on the quadrature leaf),
    and an nn.RReLU in train mode draws a random slope per node from the global RNG (the user's stream
    moved on, and χ₁ changed from one probe to the next); in eval it has the mean slope."""
    act = copy.deepcopy(act).double().eval()
    for m in act.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return act


def _phi_and_grad(act: nn.Module, x: np.ndarray, copied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    act = act if copied else _float64_copy(act)
    with torch.enable_grad():
        y = act(t)
        (g,) = torch.autograd.grad(y.sum(), t)
    return y.detach().numpy(), g.numpy()


def _grid(q: float) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint nodes in z and their weights under N(0, 1). The step shrinks with √q so that a feature
    of φ of width ~1 in x = √q z (tanh'(x)²) spans ten nodes, up to MAX_NODES."""
    n = min(MAX_NODES, math.ceil(2 * Z_MAX / min(STEP, 0.1 / math.sqrt(max(q, 1e-300)))))
    n += n % 2  # even: 0 is a cell edge, never a node
    h = 2 * Z_MAX / n
    z = (np.arange(n) + 0.5) * h - Z_MAX
    return z, h * np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def expect(act: nn.Module, q: float, copied: bool = False) -> tuple[float, float]:
    """(E[φ(√q z)²], E[φ'(√q z)²]). copied: `act` is already a float64 out-of-place copy."""
    z, w = _grid(q)
    y, g = _phi_and_grad(act, math.sqrt(max(q, 0.0)) * z, copied)
    return float(w @ y**2), float(w @ g**2)


def second_moment(act: nn.Module, q: float) -> float:
    """E[φ(√q z)²] on the fixed grid (step STEP), without autograd, for the variance map. Refined with q
    as `expect` does, an ELU net's q* read from He-init weights (σ_w² 2.01: q creeps 0.5% an iteration
    for thousands of iterations) took 20-30 s, at up to 2^18 nodes an iteration. It agrees with the
    refined grid to 1e-8 up to q = 1e4; beyond, a saturating φ's 1 − φ² is a spike of width 1/√q, and
    at q = 1e6 tanh reads E[φ²] 7e-4 high: a q* there needs σ_w² > 1e4, where that is no difference
    to the verdict. `act` is a float64 out-of-place copy."""
    z, w = _grid(min(q, (0.1 / STEP) ** 2))
    with torch.no_grad():
        y = act(torch.tensor(math.sqrt(max(q, 0.0)) * z, dtype=torch.float64)).numpy()
    return float(w @ y**2)


def q_star(act: nn.Module, sw2: float, sb2: float, q0: float = 1.0, max_iter: int = 5000) -> float:
    """Fixed point of the variance map (inf when the variance grows without bound). For a positively
    homogeneous φ (ReLU, leaky ReLU) the map is linear, q ← c q + σ_b² with c = σ_w² E[φ(z)²], and solved:
    σ_b²/(1 − c) for c < 1, inf for c > 1; at c = 1 to 1% every q is fixed when σ_b² = 0 (q0 is returned)
    and q grows without bound otherwise. Iterating would only creep for max_iter steps (He init's σ_w²
    read from the weights is 2 ± 1e-3)."""
    if sw2 <= 0.0:  # all-zero weights: q ← σ_b² at once (the slopes below divided by 0)
        return sb2
    act = _float64_copy(act)
    phi0, _ = _phi_and_grad(act, np.zeros(1), copied=True)
    if abs(phi0[0]) < 1e-12:
        slope_tiny = sw2 * second_moment(act, Q_TINY) / Q_TINY
        slope = sw2 * second_moment(act, q0) / q0
        slope4 = sw2 * second_moment(act, 4 * q0) / (4 * q0)
        if abs(slope / slope_tiny - 1) < 1e-9 and abs(slope4 / slope - 1) < 1e-9:  # q ← c q + σ_b²
            if abs(slope - 1) <= 1e-2:
                return q0 if sb2 == 0.0 else math.inf
            return sb2 / (1 - slope) if slope < 1 else math.inf
        if sb2 == 0.0 and slope_tiny <= 1.0 + 1e-9:
            return 0.0  # 0 is a fixed point and the map contracts towards it
    q = q0
    for _ in range(max_iter):
        nxt = sw2 * second_moment(act, q) + sb2
        if not math.isfinite(nxt) or nxt > 1e12:
            return math.inf
        if abs(nxt - q) <= 1e-12 * max(q, 1e-30):
            return nxt
        q = nxt
    return q


@dataclass(frozen=True)
class MeanField:
    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    depth_scale: float  # ξ = 1/|ln χ₁| (inf at criticality)
    depth: int
    too_deep: bool  # depth > 6 ξ
    keep: float = 1.0  # 1 − dropout rate after every hidden layer (train mode); σ_w² acts as σ_w²/keep
    q0: float = math.nan  # the first layer's pre-activation variance (measured), where the depth starts
    gain: float = math.nan  # ‖∂L/∂s_first‖ / ‖∂L/∂s_last‖ predicted at this depth: √∏ χ₁(q_l) from q0

    def to_dict(self) -> dict:
        return asdict(self)


def chi1(act: nn.Module, sw2: float, sb2: float) -> tuple[float, float]:
    """(χ₁, q*) for an activation module at weight variance σ_w² (times fan-in) and bias variance σ_b²."""
    q = q_star(act, sw2, sb2)
    at = Q_TINY if q == 0.0 else (1e12 if math.isinf(q) else q)
    return sw2 * expect(act, at)[1], q


def predict(act: nn.Module, name: str, sw2: float, sb2: float, depth: int, keep: float = 1.0,
            q0: float = math.nan) -> MeanField:
    """keep: 1 − the dropout rate that follows every hidden layer. Inverted dropout scales a kept unit by
    1/keep, so E[(m/keep)²] = 1/keep multiplies both maps: q ← (σ_w²/keep) E[φ²] + σ_b² and
    χ₁ = (σ_w²/keep) E[φ'²] (Schoenholz et al. 2017, section 5). q0: the first layer's pre-activation
    variance, from which `gain` follows the variance map over this depth (finite_gain)."""
    c, q = chi1(act, sw2 / keep, sb2)
    # χ₁ = 0 (all-zero weights): nothing passes a single layer, ξ = 1/|ln 0| = 0, not ∞
    xi = 0.0 if c <= 0 else math.inf if abs(math.log(c)) < 1e-12 else 1.0 / abs(math.log(c))
    gain = finite_gain(act, sw2 / keep, sb2, q0, depth) if math.isfinite(q0) else math.nan
    return MeanField(name, sw2, sb2, q, c, xi, depth, depth > TRAINABLE_DEPTHS * xi, keep, q0, gain)


def finite_gain(act: nn.Module, sw2: float, sb2: float, q0: float, depth: int) -> float:
    """√∏ χ₁(q_l) over the depth − 1 steps between `depth` layers, q_l following the variance map
    q ← σ_w² E[φ(√q z)²] + σ_b² from q0: mean field's gain from the last layer's ‖∂L/∂s‖ to the first's
    at this depth, before q has reached q*. χ₁ at q* and ξ describe the limit of infinite depth: a He-init
    GELU MLP has q* ≈ 0.01 and χ₁(q*) ≈ 0.52 (ξ 1.5), but GELU is ReLU-like at large q, so from q0 ≈ 2 the
    variance falls by less than 10% a layer; 13 layers read a gain of 0.63 and were called too deep."""
    act = _float64_copy(act)
    q, log_gain2 = q0, 0.0
    for _ in range(max(depth - 1, 0)):
        e_phi2, e_dphi2 = expect(act, q, copied=True)
        if not sw2 * e_dphi2 > 0:
            return 0.0
        log_gain2 += math.log(sw2 * e_dphi2)
        q = sw2 * e_phi2 + sb2
        if not math.isfinite(q) or q > 1e12:
            return math.inf
    return math.exp(0.5 * log_gain2) if log_gain2 < 1400 else math.inf
