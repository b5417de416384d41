"""Adaptive Gradient Clipping, unit-wise (Brock, De, Smith, Simonyan 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", arXiv:2102.06171).

Each output unit's gradient (a row of a Linear weight, one filter of a Conv weight) is clipped to
λ times the norm of that unit's weights, so a step can never change a unit by more than a fixed
fraction of its size. The formula is timm's ``adaptive_clip_grad``:

    max_norm = max(‖w_i‖, eps) · λ ;   g_i ← g_i · max_norm / max(‖g_i‖, 1e-6)   where ‖g_i‖ > max_norm

with norms over every dimension but the first (and over the whole tensor for 0-/1-d parameters).
Stateless, so non-finite gradients cannot poison it; they stay non-finite for `gw.guard` to catch.
"""

from __future__ import annotations

import torch

from gradwatch.remedies._common import Params, as_list, positive_number
from gradwatch.remedies._sharded import fsdp1_layout, is_dtensor, sharded_agc


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """2-norm per output unit (dims 1..n, kept for broadcasting); whole-tensor norm for ndim <= 1."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


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
            return sharded_agc(params, self.clipping, self.eps, layout, group)
        squares = []
        for p in params:
            if p.grad is None:
                continue
            g = p.grad
            max_norm = unitwise_norm(p.detach()).clamp(min=self.eps).mul_(self.clipping)
            grad_norm = unitwise_norm(g)
            squares.append(grad_norm.square().sum())  # the unit norms add up to the total norm
            coef = torch.where(grad_norm < max_norm, torch.ones_like(grad_norm),
                               max_norm / grad_norm.clamp(min=1e-6))
            g.mul_(coef.to(g.dtype))
        if not squares:
            return torch.zeros(())
        first = squares[0].device
        return torch.stack([s.to(first) for s in squares]).sum().sqrt()

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping:g}, eps={self.eps:g})"
