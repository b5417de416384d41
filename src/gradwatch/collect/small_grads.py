"""Small gradients (a bias, a norm layer's weights) reduced together after backward.

A gradient of at most SMALL_GRAD entries gains nothing from being read in its hook while in cache,
and a kernel launch per tensor (5-10 µs) costs more than reading 16 KB again: its hook only keeps
it, and after backward the kept gradients are stacked by shape and reduced in a few kernels (on
the CPU each norm is bitwise the one `vector_norm` gives the tensor alone).
"""

from __future__ import annotations

import math

import torch

from gradwatch.collect.stats import norm32, shape_groups

SMALL_GRAD = 4096


class SmallGrads:
    """The small gradients kept by the hooks of one backward (`indices`: their parameters' positions,
    `grads`: the gradients, appended to by the hooks), and how the last read grouped them."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.grads: list[torch.Tensor] = []
        # the last grouping, reused while the same parameters arrive in the same order with the
        # same dtypes (almost always): a (shape, dtype) key per gradient cost 1-2 µs each, 2-5 ms a
        # step for 2000 of them; a shape changed since is seen as the stack of its group fails
        self._order: list[int] = []
        self._dtypes: list[torch.dtype] = []
        self._groups: list[list[int]] = []
        self._index: torch.Tensor | None = None

    def clear(self) -> None:
        self.indices.clear()
        self.grads.clear()

    @torch.no_grad()  # (as in the hooks)
    def read(self, params: list[torch.Tensor], norm_out: torch.Tensor, max_out: torch.Tensor,
             weight_out: torch.Tensor, sampled: bool) -> None:
        """The statistics of the kept gradients into the buffers the hooks write (max |g| and the
        weights' norms on sampled steps), then forget them."""
        if not self.indices:
            return
        stacks = self._stacks(norm_out.device)
        norm_out.index_copy_(0, self._index, torch.cat([norm32(s, dim=1) for s in stacks]))
        if sampled:
            max_out.index_copy_(0, self._index, torch.cat([norm32(s, math.inf, dim=1) for s in stacks]))
            weights = [params[i] for i in self.indices]
            weight_out.index_copy_(0, self._index, torch.cat([norm32(s, dim=1) for s in self._stack(weights)]))
        self.clear()

    def _stacks(self, device: torch.device) -> list[torch.Tensor]:
        """The kept gradients stacked by (shape, dtype), each flattened to a row."""
        dtypes = [g.dtype for g in self.grads]
        if self.indices == self._order and dtypes == self._dtypes:
            stacks = self._stack(self.grads)
            if stacks is not None:
                return stacks
        keys = [(g.shape, g.dtype) for g in self.grads]
        self._order, self._dtypes = self.indices[:], dtypes
        self._groups = shape_groups(keys)
        self._index = torch.tensor([self.indices[k] for group in self._groups for k in group], device=device)
        return self._stack(self.grads)

    def _stack(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Each group of the last grouping stacked; None when their shapes differ now."""
        out = []
        for group in self._groups:
            try:
                stacked = torch.stack([tensors[k] for k in group])
            except RuntimeError:  # (stack refuses tensors of different shapes)
                return None
            out.append(stacked.reshape(len(group), -1))  # (not flatten(1): a 0-dim weight, a temperature)
        return out
