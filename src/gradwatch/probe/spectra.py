"""Singular values of a Jacobian from Jacobian-vector products only.

A Jacobian J (N_out x N_in) is never formed: everything here needs two callables, `jvp(v) = J v` and
`vjp(u) = Jᵀ u`. Two ways to get them:

- `func_ops(f, x)`: `torch.func.jvp` / `torch.func.vjp` of a standalone function (a cell, a small
  block); the vjp closure is built once and reused.
- `graph_ops(out, inp, via)`: two tensors of an already recorded autograd graph (a layer's input and the
  next layer's input inside a model), through the layer's outputs `via`. `vjp` is one backward through the block; `jvp` is the
  "double-vjp" trick: g(w) = Jᵀ w is linear in a dummy w, so d⟨g(w), v⟩/dw = J v. The graph of g is
  built once, so each jvp is one more backward of the block — no re-run of the model's prefix.

What is estimated, on A = JᵀJ or JJᵀ, whichever is smaller (for a batch of B samples whose
Jacobian is block-diagonal — samples do not interact — A's eigenvalues are the squared singular
values of every sample's Jacobian, k = min(n_in, n_out) per sample):

- `top`: the largest singular value (over the batch), by power iteration on A, warm-started from
  the Lanczos Ritz vector below, stopped when the residual ‖Av − λv‖ is below `tol`·λ or after
  `iters` steps.
- `mean`: the mean singular value, tr(A^½) / dim A, by stochastic Lanczos quadrature (Ubaru, Chen
  & Saad 2017): `lanczos` steps from a Gaussian probe vector over the whole batch (one vector when
  dim A ≥ 4096 — B per-sample probes in effect —, up to 8 for small blocks, `max_probes`).
- `rms`: the root-mean-square singular value, sqrt(tr(A) / dim A): Hutchinson's estimator with the
  same probe vectors (exact for each: vᵀAv / vᵀv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Op = Callable[[torch.Tensor], torch.Tensor]
PROBE_DIMS = 4096  # SLQ probe vectors until their total length reaches this (one for big layers) ...
MAX_PROBES = 8  # ... but no more than this many


@dataclass(frozen=True)
class Spectrum:
    top: float
    mean: float
    rms: float


def func_ops(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[Op, Op, torch.Tensor]:
    """(jvp, vjp, f(x)) of a standalone function with torch.func."""
    out, vjp_fn = torch.func.vjp(f, x)

    def jvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, (x,), (v,))[1]

    return jvp, (lambda u: vjp_fn(u)[0]), out


def graph_ops(out: torch.Tensor, inp: torch.Tensor, via: Sequence[torch.Tensor] = ()) -> tuple[Op, Op]:
    """(jvp, vjp) between two tensors of a recorded graph (`out` computed from `inp`). With `via` (a
    layer's outputs), only the paths through them count, J = ∂out/∂via · ∂via/∂inp: a shortcut from
    `inp` around the layer (x + f(x), a parallel branch reading the same input) is held fixed.
    Raises ValueError when `out` does not depend on `inp` (through `via`) differentiably."""
    via = [] if any(t is out for t in via) else [t for t in via if t.requires_grad]

    def back(cot: torch.Tensor, create: bool = False) -> torch.Tensor:
        outs, cots = [out], [cot]
        if via:
            mids = torch.autograd.grad(out, via, cot, retain_graph=True, create_graph=create, allow_unused=True)
            outs, cots = [t for t, m in zip(via, mids) if m is not None], [m for m in mids if m is not None]
        g = (torch.autograd.grad(outs, inp, cots, retain_graph=True, create_graph=create, allow_unused=True)[0]
             if outs else None)
        if g is None:
            raise ValueError("output does not depend on input")
        return g

    dummy = torch.zeros_like(out, requires_grad=True)
    g_of_dummy = back(dummy, create=True)

    def jvp(v: torch.Tensor) -> torch.Tensor:
        g = (torch.autograd.grad(g_of_dummy, dummy, v, retain_graph=True, allow_unused=True)[0]
             if g_of_dummy.requires_grad else None)
        if g is not None:
            return g
        # No path back to the dummy: J is zero (a step function's backward), or the backward is not
        # differentiable (@once_differentiable, a numpy backward), which a zero would hide as σ = 0.
        if _jacobian_is_zero(back, out):
            return torch.zeros_like(out)
        raise RuntimeError("its backward is not differentiable (@once_differentiable or a backward "
                           "outside torch)")

    return jvp, back


def _jacobian_is_zero(back: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor) -> bool:
    """Jᵀu = 0 for a fixed random u (seeded: the global RNG is the user's)."""
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
    return not bool(back(u).detach().any())


def _lanczos(matvec: Op, v0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Lanczos on a symmetric PSD operator with full reorthogonalisation (steps is small).
    Returns Ritz values, the first components of the Ritz vectors, and the basis."""
    basis = [v0 / torch.linalg.vector_norm(v0)]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[j]).detach()
        alpha = torch.vdot(w.flatten(), basis[j].flatten()).real
        alphas.append(alpha)
        for q in basis:  # full reorthogonalisation: w -= Q Qᵀ w (twice is enough)
            w = w - torch.vdot(q.flatten(), w.flatten()) * q
        for q in basis:
            w = w - torch.vdot(q.flatten(), w.flatten()) * q
        beta = torch.linalg.vector_norm(w)
        if j == steps - 1 or float(beta) <= 1e-10 * max(abs(float(alpha)), 1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    t = torch.diag(torch.stack(alphas).double())
    if k > 1:
        off = torch.stack(betas[: k - 1]).double()
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, vecs = torch.linalg.eigh(t)
    return theta.clamp_min(0.0), vecs, basis[:k]


def spectrum(jvp: Op, vjp: Op, x: torch.Tensor, out_shape: torch.Size | tuple[int, ...], *, iters: int = 30,
             lanczos: int = 10, tol: float = 1e-3, generator: torch.Generator | None = None,
             max_probes: int = MAX_PROBES) -> Spectrum:
    """Top, mean and RMS singular value of the Jacobian at `x` (a tensor shaped like the input; the
    output has `out_shape`). Works on the smaller of JᵀJ and JJᵀ, whose eigenvalues are exactly the
    squared singular values (no zeros from a narrowing or widening block). max_probes caps the SLQ
    probe vectors: 1 where each product is expensive (a backward through time)."""
    if math.prod(out_shape) < x.numel():
        first, second, shape = vjp, jvp, tuple(out_shape)  # J Jᵀ on the output side
    else:
        first, second, shape = jvp, vjp, tuple(x.shape)  # Jᵀ J on the input side
    matvec = lambda v: second(first(v))  # noqa: E731
    numel = math.prod(shape)
    steps = max(1, min(lanczos, numel))
    probes = max(1, min(max_probes, math.ceil(PROBE_DIMS / numel)))
    means, squares, best = [], [], None
    for _ in range(probes):
        v0 = torch.randn(shape, generator=generator, dtype=x.dtype).to(x.device)
        theta, vecs, basis = _lanczos(matvec, v0, steps)
        weights = vecs[0] ** 2  # Gauss quadrature weights of the spectral measure seen by v0
        means.append(float((weights * theta.sqrt()).sum()))
        squares.append(float((weights * theta).sum()))
        if best is None or theta[-1] > best[0][-1]:
            best = (theta, vecs, basis)
    mean = sum(means) / probes
    rms = math.sqrt(sum(squares) / probes)
    theta, vecs, basis = best
    # Power iteration from the top Ritz vector.
    y = vecs[:, -1].to(x.dtype)
    v = sum(float(c) * q for c, q in zip(y, basis))
    v = v / torch.linalg.vector_norm(v)
    top = math.sqrt(float(theta[-1]))
    for _ in range(iters):
        u = first(v).detach()
        w = second(u).detach()
        lam = float(torch.vdot(u.flatten(), u.flatten()).real)  # vᵀAv, v of unit norm
        top = math.sqrt(lam) if math.isfinite(lam) else math.nan
        if not math.isfinite(lam) or lam == 0.0:
            break
        if float(torch.linalg.vector_norm(w - lam * v)) <= tol * lam:  # an eigenpair of JᵀJ to tol
            break
        v = w / torch.linalg.vector_norm(w)
    return Spectrum(top=top, mean=mean, rms=rms)
