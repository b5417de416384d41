"""Gradients through time: ‖∂L_T/∂h_k‖ against T−k, and W_hh against the 1/γ bound (Pascanu et al. 2013).

A recurrent layer is replayed as a step function `cell(x_t, h) -> h` (h a tensor or a tuple of
tensors, e.g. LSTM's (h, c)) from the first state h_0 over the recorded inputs x_1..x_T. With
L_T = ⟨r, h_T⟩ for a random direction r of unit norm per sample, ∂L_T/∂h_k = r ∏ ∂h_i/∂h_{i−1}:
the profile reported is ‖∂L_T/∂h_k‖ / ‖∂L_T/∂h_T‖ for T−k = 0..T (norms over the batch and over
every state tensor, so LSTM's cell state counts). The BPTT horizon is the first T−k at which the
profile falls below 1e-3 or rises above 1e3 (None when neither happens within the sequence); the
rate is exp of the least-squares slope of ln(profile) against T−k — the per-step factor, which for
a linear(ised) cell with a normal W_hh equals its spectral radius.

Pascanu et al.: with |φ'| ≤ γ (γ = 1 for tanh and ReLU, 1/4 for sigmoid), σ_max(W_hh) < 1/γ is
sufficient for vanishing gradients and σ_max(W_hh) > 1/γ necessary for exploding ones. For GRU and
LSTM the block of W_hh that feeds the tanh candidate (GRU's W_hn, LSTM's W_hg) is reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from gradwatch.diagnose.thresholds import DEFAULT
from gradwatch.errors import ConfigError

# the cut-offs of the diagnose rule on a run's own time profiles, so prediction and run agree
VANISH, EXPLODE = DEFAULT.time_vanishing_ratio, DEFAULT.time_exploding_ratio
GAMMA = {"tanh": 1.0, "relu": 1.0, "sigmoid": 0.25}

State = torch.Tensor | tuple[torch.Tensor, ...]
Cell = Callable[[torch.Tensor, State], State]


@dataclass
class RecurrentProbe:
    name: str
    kind: str  # RNN / GRU / LSTM / RNNCell / ... / cell
    layer: int  # stacked layer index (0 for cells)
    profile: list[float]  # ‖∂L_T/∂h_k‖ / ‖∂L_T/∂h_T‖ for T−k = 0..T
    horizon: int | None
    direction: str  # "vanishing" | "exploding" | "within range"
    rate: float  # fitted per-step factor
    spectral_norm: float = math.nan
    spectral_radius: float = math.nan
    gamma: float = math.nan
    bound: float = math.nan  # 1/γ
    notes: list[str] = field(default_factory=list)
    gate_bias: float = math.nan  # mean bias of the memory gate (LSTM forget, GRU update); NaN: none

    def to_dict(self) -> dict:
        return asdict(self)


def _tuple(h: State) -> tuple[torch.Tensor, ...]:
    return tuple(h) if isinstance(h, (tuple, list)) else (h,)


def bptt_profile(cell: Cell, xs: list[torch.Tensor] | torch.Tensor, h0: State,
                 generator: torch.Generator | None = None) -> tuple[list[float], list[State]]:
    """Normalised ‖∂L_T/∂h_k‖ for T−k = 0..T, and the states h_1..h_T (detached)."""
    h = tuple(t.detach().clone().requires_grad_(True) for t in _tuple(h0))
    single = not isinstance(h0, (tuple, list))
    states = [h]
    with torch.enable_grad():
        for x in xs:
            nxt = cell(x, h[0] if single else h)
            # Fresh nodes for the state as the next step's input: the gradient at LSTM's c_k is then
            # ∂L/∂c_k with h_k held fixed, as for the module's (h_k, c_k), not plus the c_k -> h_k path.
            h = tuple(t.view_as(t) for t in _tuple(nxt))
            states.append(h)
        last = h[0]
        r = torch.randn(last.shape, generator=generator, dtype=last.dtype).to(last.device)
        per_sample = r.flatten(1).norm(dim=1).view(-1, *[1] * (r.dim() - 1)) if r.dim() > 1 else r.norm()
        r = r / per_sample.clamp_min(1e-30)  # unit norm per sample: every sample weighs the same
        flat = [t for s in states for t in s]
        grads = torch.autograd.grad((r * last).sum(), flat, allow_unused=True)
    norms, i = [], 0
    for s in states:
        sq = sum(float(g.double().pow(2).sum()) for g in grads[i:i + len(s)] if g is not None)
        norms.append(math.sqrt(sq))
        i += len(s)
    norms = norms[::-1]  # index = T−k
    ref = norms[0] if norms[0] > 0 else 1.0
    detached = [tuple(t.detach() for t in s) for s in states[1:]]
    return [n / ref for n in norms], [d[0] if single else d for d in detached]


def horizon_of(profile: list[float]) -> tuple[int | None, str]:
    for lag, v in enumerate(profile):
        if not math.isfinite(v) or v > EXPLODE:
            return lag, "exploding"
        if v < VANISH:
            return lag, "vanishing"
    return None, "within range"


def fitted_rate(profile: list[float]) -> float:
    lags = np.arange(len(profile), dtype=float)
    vals = np.asarray(profile, dtype=float)
    ok = np.isfinite(vals) & (vals > 0)
    if ok.sum() < 2:
        return math.nan
    slope = np.polyfit(lags[ok], np.log(vals[ok]), 1)[0]
    return float(math.exp(slope))


def w_hh_spectrum(w: torch.Tensor) -> tuple[float, float]:
    """(spectral norm, spectral radius) of a square recurrent matrix."""
    w = w.detach().double().cpu()
    return float(torch.linalg.matrix_norm(w, ord=2)), float(torch.linalg.eigvals(w).abs().max())


def probe_cell(cell: Cell, xs: list[torch.Tensor] | torch.Tensor, h0: State, *, name: str = "cell",
               w_hh: torch.Tensor | None = None, nonlinearity: str = "tanh",
               generator: torch.Generator | None = None) -> RecurrentProbe:
    """Probe a step function `cell(x_t, h) -> h` over inputs xs (a list, or a tensor with time first)
    from state h0. Give `w_hh` (the recurrent matrix) for the Pascanu bound check."""
    if not callable(cell):
        raise ConfigError(f"cell must be a step function cell(x_t, h) -> h, got {type(cell).__name__}")
    try:
        profile, _ = bptt_profile(cell, xs, h0, generator)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = xs[0] if len(xs) else None
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise ConfigError(f"probe_cell: the cell failed on x_0 of shape {shape} ({type(exc).__name__}: {exc}); pass "
                          "xs with time first (T, batch, features) or a list of per-step inputs, and h0 the state "
                          "the cell takes") from exc
    return _report(name, "cell", 0, profile, w_hh, nonlinearity)


def _report(name, kind, layer, profile, w_hh, nonlinearity, notes=()) -> RecurrentProbe:
    horizon, direction = horizon_of(profile)
    out = RecurrentProbe(name, kind, layer, profile, horizon, direction, fitted_rate(profile), notes=list(notes))
    if w_hh is not None:
        out.spectral_norm, out.spectral_radius = w_hh_spectrum(w_hh)
        out.gamma = GAMMA.get(nonlinearity, 1.0)
        out.bound = 1.0 / out.gamma
    return out


def gate_bias(m: nn.Module, layer: int | None = None) -> float:
    """Mean of b_ih + b_hh over the gate that keeps the state (LSTM's forget gate f, rows h:2h of i, f, g,
    o; GRU's update gate z, rows h:2h of r, z, n): at 0 the gate is σ(0) = 1/2 and the memory halves every
    step. NaN for a module without biases or another kind."""
    if not isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)):
        return math.nan
    sfx = "" if layer is None else f"_l{layer}"
    b_ih, b_hh = getattr(m, "bias_ih" + sfx, None), getattr(m, "bias_hh" + sfx, None)
    if b_ih is None or b_hh is None:
        return math.nan
    n = m.hidden_size
    return float((b_ih[n:2 * n] + b_hh[n:2 * n]).detach().double().mean())


def candidate_block(w_hh: torch.Tensor, hidden: int, lstm: bool) -> torch.Tensor:
    """The rows of a gated W_hh that feed the candidate state (LSTM gate g: 2h:3h of i, f, g, o;
    GRU n: 2h: of r, z, n), the block the Pascanu bound applies to."""
    return w_hh[2 * hidden:3 * hidden] if lstm else w_hh[2 * hidden:]


def _module_cell(m: nn.RNNBase, layer: int) -> tuple[Cell, torch.Tensor, str]:
    """A step function for one stacked layer (forward direction) of nn.RNN / nn.GRU / nn.LSTM, the block
    of W_hh the Pascanu bound applies to, and the nonlinearity of that block."""
    sfx = f"_l{layer}"
    w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
    b_ih = getattr(m, "bias_ih" + sfx, None) if m.bias else None
    b_hh = getattr(m, "bias_hh" + sfx, None) if m.bias else None
    lin = lambda x, w, b: torch.nn.functional.linear(x, w, b)  # noqa: E731
    hidden = m.hidden_size
    if isinstance(m, nn.LSTM):
        def cell(x, state):
            h, c = state
            i, f, g, o = (lin(x, w_ih, b_ih) + lin(h, w_hh, b_hh)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        return cell, candidate_block(w_hh, hidden, lstm=True), "tanh"
    if isinstance(m, nn.GRU):
        def cell(x, h):
            xr, xz, xn = lin(x, w_ih, b_ih).chunk(3, -1)
            hr, hz, hn = lin(h, w_hh, b_hh).chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            return (1 - z) * torch.tanh(xn + r * hn) + z * h
        return cell, candidate_block(w_hh, hidden, lstm=False), "tanh"
    act = torch.tanh if m.nonlinearity == "tanh" else torch.relu
    return (lambda x, h: act(lin(x, w_ih, b_ih) + lin(h, w_hh, b_hh))), w_hh, m.nonlinearity


def probe_module(name: str, m: nn.RNNBase, x: torch.Tensor, hx: State | None,
                 generator: torch.Generator | None = None) -> list[RecurrentProbe]:
    """Every stacked layer of an nn.RNN/GRU/LSTM, replayed on its recorded input."""
    kind = type(m).__name__
    if getattr(m, "proj_size", 0):
        return [RecurrentProbe(name, kind, 0, [], None, "within range", math.nan, notes=["proj_size > 0: not probed"])]
    notes, rows = [], None
    if isinstance(x, nn.utils.rnn.PackedSequence):
        # Padded to (T, B, F) in the batch's own order (as hx is); the replay runs the samples of the
        # longest length T only, so that no step of any replayed sample is padding.
        x, lengths = nn.utils.rnn.pad_packed_sequence(x)
        rows = lengths == lengths.max()
        x = x[:, rows.to(x.device)]
        notes.append(f"packed sequence: the {int(rows.sum())} of {len(lengths)} samples of the longest length "
                     f"{int(lengths.max())}")
    elif x.dim() == 2:
        x = x.unsqueeze(1)  # unbatched (T, F)
    elif m.batch_first:
        x = x.transpose(0, 1)
    seq = x.detach()  # (T, B, F)
    layers = 1 if m.bidirectional else m.num_layers
    notes += ["bidirectional: forward direction of layer 0 only"] if m.bidirectional else []
    dirs = 2 if m.bidirectional else 1
    out = []
    for layer in range(layers):
        if hx is None:
            h0 = torch.zeros(seq.shape[1], m.hidden_size, dtype=seq.dtype, device=seq.device)
            state = (h0, h0.clone()) if isinstance(m, nn.LSTM) else h0
        else:
            pick = lambda t: (t[layer * dirs] if t.dim() == 3 else t[layer * dirs].unsqueeze(0)).detach()  # noqa: E731
            state = tuple(pick(t) for t in hx) if isinstance(hx, (tuple, list)) else pick(hx)
            if rows is not None:
                keep = lambda t: t[rows.to(t.device)]  # noqa: E731
                state = tuple(keep(t) for t in state) if isinstance(state, tuple) else keep(state)
        cell, w, nonlin = _module_cell(m, layer)
        profile, states = bptt_profile(cell, list(seq), state, generator)
        out.append(_report(name, kind, layer, profile, w, nonlin, notes))
        out[-1].gate_bias = gate_bias(m, layer)
        seq = torch.stack([s[0] if isinstance(s, tuple) else s for s in states])
    return out
