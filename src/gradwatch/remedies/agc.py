"""Adaptive Gradient Clipping, unit-wise (Brock, De, Smith, Simonyan 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", arXiv:2102.06171).

Each output unit's gradient (a row of a Linear weight, one filter of a Conv weight) is clipped to
λ times the norm of that unit's weights, so a step can never change a unit by more than a fixed
fraction of its size. The formula is timm's ``adaptive_clip_grad``:

    max_norm = max(‖w_i‖, eps) · λ ;   g_i ← g_i · max_norm / max(‖g_i‖, 1e-6)   where ‖g_i‖ > max_norm

with norms over every dimension but the first (and over the whole tensor for 0-/1-d parameters).
Stateless, so non-finite gradients cannot poison it; a unit whose gradient norm is not finite is
left as it is (scaling an Inf by 0 only makes a NaN), for `gw.guard` to catch. A sparse gradient
(nn.Embedding(sparse=True)) is clipped over the rows it stores; the others are zero.
"""

from __future__ import annotations

import torch

from gradwatch.errors import ConfigError
from gradwatch.remedies._common import Params, as_list, coalesced_grad, coef_dtype, positive_number, wide_norm
from gradwatch.remedies._sharded import fsdp1_layout, is_dtensor, sharded_agc


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """2-norm per output unit (dims 1..n, kept for broadcasting); whole-tensor norm for ndim <= 1.
    Summed in float32 for float16/bfloat16 (a finite unit's norm may exceed float16's range)."""
    if x.ndim <= 1:
        return wide_norm(x)
    return wide_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def unit_coef(grad_norm: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """Per unit: max_norm / max(‖g‖, 1e-6) where ‖g‖ >= max_norm, else 1; and 1 where either norm
    is not finite, so a non-finite unit is left as it is (scaling an Inf by 0 only makes a NaN)."""
    keep = (grad_norm < max_norm) | ~(torch.isfinite(grad_norm) & torch.isfinite(max_norm))
    return torch.where(keep, torch.ones_like(grad_norm), max_norm / grad_norm.clamp(min=1e-6))


def sparse_units(index: int, p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, gradient) of the units a coalesced sparse gradient stores: its values and the rows
    of `p` they belong to (the whole of a 0-/1-d `p`). Units it does not store have a zero gradient."""
    if p.ndim <= 1:
        return p.detach(), grad._values()
    if grad.sparse_dim() != 1:
        raise ConfigError(
            f"AGC: parameter {index} (shape {tuple(p.shape)}) has a sparse gradient over its first "
            f"{grad.sparse_dim()} dims; AGC clips whole rows, which needs the rows alone to be sparse (as "
            "nn.Embedding(sparse=True) makes them): pass AGC the other parameters only, or use a dense gradient"
        )
    return p.detach()[grad._indices()[0]], grad._values()


class AGC:
    """Unit-wise adaptive gradient clipping; ``AGC()(params)`` returns the total norm before clipping.

    Defaults are the paper's: λ = 0.01 (its choice for large batches), eps = 1e-3 (so units whose
    weights start at zero can still move). The paper does not clip the final classifier layer;
    pass the parameters you want clipped. Sharded by FSDP, units split across ranks are clipped by
    their norm over all ranks: FSDP2 needs nothing more; FSDP1 needs ``fsdp=`` the wrapped model.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, fsdp: torch.nn.Module | None = None) -> None:
        self.clipping = positive_number("clipping", clipping, fix="pass λ, e.g. AGC(clipping=0.01)")
        self.eps = positive_number("eps", eps, fix="pass e.g. AGC(eps=1e-3)")
        self.last_norm: torch.Tensor | None = None
        self._layout = fsdp1_layout(fsdp) if fsdp is not None else None

    @torch.no_grad()
    def __call__(self, params: Params) -> torch.Tensor:
        params = as_list(params)
        if self._layout is not None or any(is_dtensor(p) for p in params):
            layout, group = self._layout or (None, None)
            self.last_norm = sharded_agc(params, self.clipping, self.eps, layout, group)
            return self.last_norm
        squares = [self._clip(i, p) for i, p in enumerate(params) if p.grad is not None]
        if not squares:
            self.last_norm = torch.zeros(())
        else:
            first = squares[0].device
            self.last_norm = torch.stack([s.to(first) for s in squares]).sum().sqrt()
        return self.last_norm

    def _clip(self, index: int, p: torch.Tensor) -> torch.Tensor:
        """Clip `p`'s gradient unit by unit, in place; returns its squared norm before clipping."""
        w, g = p.detach(), coalesced_grad(p)
        if g.is_sparse:
            w, g = sparse_units(index, p, g)
        max_norm = unitwise_norm(w).clamp(min=self.eps).mul_(self.clipping)
        grad_norm = unitwise_norm(g)
        g.mul_(unit_coef(grad_norm, max_norm).to(coef_dtype(g.dtype)))
        return grad_norm.square().sum()  # the unit norms add up to the total norm

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping:g}, eps={self.eps:g})"
