"""Small gradients (a bias, a norm layer's weights) reduced together after backward.

A gradient of at most SMALL_GRAD entries gains nothing from being read in its hook while in cache,
and a kernel launch per tensor (5-10 µs) costs more than reading 16 KB again: its hook only keeps
it, and after backward the kept gradients are stacked by shape and reduced in a few kernels. A
shape shared by fewer than STACK_MIN gradients is not worth a stack (~30 µs a group): those go
through one `_foreach_norm` (~5 µs a tensor). On the CPU each norm is bitwise the one `vector_norm`
gives the tensor alone, either way.
"""

from __future__ import annotations

import math

import torch

from gradwatch.collect.stats import foreach_norm32, norm32, shape_groups

SMALL_GRAD = 4096
STACK_MIN = 4  # (a 3-layer MLP's 6 gradients, 4 shapes: read in 0.13 ms stacked, 0.04 ms in one foreach)


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
        self._groups: list[list[int]] = []  # stacked: STACK_MIN or more gradients of one shape and dtype
        self._loose: list[int] = []  # the others, read by one foreach call
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
        norm_out.index_copy_(0, self._index, self._norms(stacks, self.grads))
        if sampled:
            max_out.index_copy_(0, self._index, self._norms(stacks, self.grads, math.inf))
            weights = [params[i] for i in self.indices]
            weight_out.index_copy_(0, self._index, self._norms(self._stack(weights), weights))
        self.clear()

    def _norms(self, stacks: list[torch.Tensor], tensors: list[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
        """Each tensor's norm32, in the order of `_index`: the stacked groups', then the loose ones'."""
        parts = [norm32(s, ord, dim=1) for s in stacks]
        if self._loose:
            parts.append(foreach_norm32([tensors[k] for k in self._loose], ord))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _stacks(self, device: torch.device) -> list[torch.Tensor]:
        """The kept gradients stacked by (shape, dtype), each flattened to a row."""
        dtypes = [g.dtype for g in self.grads]
        if self.indices == self._order and dtypes == self._dtypes:
            stacks = self._stack(self.grads)
            if stacks is not None:
                return stacks
        keys = [(g.shape, g.dtype) for g in self.grads]
        self._order, self._dtypes = self.indices[:], dtypes
        groups = shape_groups(keys)
        self._groups = [group for group in groups if len(group) >= STACK_MIN]
        self._loose = [k for group in groups if len(group) < STACK_MIN for k in group]
        order = [k for group in self._groups for k in group] + self._loose
        self._index = torch.tensor([self.indices[k] for k in order], device=device)
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
