"""Each activation and its derivative, computed by autograd: the bounds behind vanishing gradients."""

from __future__ import annotations

from pathlib import Path

import torch

from gradwatch.lab import nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.page import figure, save

NAMES = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "softsign")
SELU_SCALE, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772


def derivative(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), f'(x)) in float64, the derivative by autograd (PReLU at its initial slope 0.25)."""
    act = nets.activation(name).double()
    x = x.detach().clone().requires_grad_(True)
    y = act(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), grad


def run(quick: bool, out: Path, progress: Progress) -> Result:
    x = torch.arange(-6000, 6001, dtype=torch.float64) / 1000  # step 0.001, x = 0 exactly
    progress.phase("derivatives by autograd", len(NAMES))
    res = Result(["activation", "f(0)", "max f'", "at x", "min f'", "f'(-6)", "f'(6)"], [])
    res.notes.append("grid: x from -6 to 6 in steps of 0.001 (float64); derivatives by torch.autograd")
    curves = {}
    for name in NAMES:
        y, d = derivative(name, x)
        i = int(d.argmax())
        res.rows.append([name, float(y[6000]), float(d.max()), float(x[i]), float(d.min()), float(d[0]), float(d[-1])])
        curves[name] = (y, d)
        progress.advance()
    stats = {r[0]: r for r in res.rows}
    s = stats["sigmoid"]
    res.check("sigmoid' is at most 0.25, reached at x = 0: each sigmoid layer multiplies the backward "
              "signal by at most 1/4", s[2] == 0.25 and s[3] == 0.0, max=s[2], at=s[3], five_layers=0.25 ** 5)
    t = stats["tanh"]
    res.check("tanh' is at most 1, reached at x = 0", t[2] == 1.0 and t[3] == 0.0, max=t[2], at=t[3])
    r = stats["relu"]
    res.check("ReLU' is 1 for x > 0 and 0 for x < 0: no shrinking, but dead when negative",
              r[2] == 1.0 and r[4] == 0.0, max=r[2], min=r[4])
    e = stats["selu"]
    res.check("SELU' peaks at scale·alpha ≈ 1.758 at 0 from the left (it can amplify)",
              abs(e[2] - SELU_SCALE * SELU_ALPHA) < 1e-2 and e[3] <= 0, max=e[2], expected=SELU_SCALE * SELU_ALPHA)
    ss = stats["softsign"]
    res.check("softsign' is at most 1 at 0 and decays polynomially (1/(1+|x|)^2), slower than tanh'",
              ss[2] == 1.0 and ss[5] > 100 * t[5], softsign_at_6=ss[5], tanh_at_6=t[5])
    fig, (a, b) = figure(2)
    for name, (y, d) in curves.items():
        a.plot(x, y, label=name, lw=1)
        b.plot(x, d, label=name, lw=1)
    a.set_title("activation f(x)", fontsize=9)
    b.set_title("derivative f'(x) (autograd)", fontsize=9)
    b.axhline(0.25, color="grey", ls=":", lw=1, label="0.25 (max sigmoid')")
    a.set_ylim(-2, 4)
    a.set_ylabel("f(x)")
    b.set_ylabel("f'(x)")
    for ax in (a, b):
        ax.set_xlabel("x")
        ax.legend(fontsize=7, ncol=2)
    res.figures.append(save(fig, out, "activations"))
    return res


EXPERIMENT = Experiment(
    name="activations",
    title="activations and their derivatives",
    claim="sigmoid' ≤ 0.25 (at x = 0), tanh' ≤ 1: saturating activations shrink the backward signal layer "
          "after layer; ReLU passes it unchanged where active.",
    expected="autograd gives max sigmoid' = 0.25 exactly at 0, max tanh' = 1 at 0, ReLU' ∈ {0, 1}, "
             "SELU' up to λα ≈ 1.758.",
    source="seed claims; Glorot & Bengio 2010; Klambauer et al. 2017 (SELU)",
    run=run,
)
