"""AutoClip: clip the total gradient norm to a percentile of its own history (Seetharaman, Wichern,
Pardo, Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
arXiv:2007.14469).

As in the paper's reference code, the current norm joins the history before the percentile is
taken (``np.percentile(history, p)`` with linear interpolation), and the default is its p = 10
on the global norm. (The ``autoclip`` package differs: quantile 0.9 over the last 1000 norms,
current norm excluded.) The history lives on the device in a buffer that doubles when full, so
no step reads a value on the host. Non-finite norms are stored as NaN, which ``nanquantile``
ignores: they never enter the percentile, and their gradients are left for `gw.guard`.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch.errors import ConfigError
from gradwatch.remedies._common import (
    Params,
    clip_coef,
    grads_of,
    in_range,
    norm_order,
    scale_,
    total_norm,
    whole_number,
)


class AutoClip:
    """``AutoClip(percentile=10)(params)`` clips to the p-th percentile of all norms seen, returns the norm.

    `window` keeps only the last N norms (a ring buffer) for very long runs, where sorting the whole
    history every step would cost time; None (the default, as in the paper) keeps all of them.
    """

    def __init__(self, percentile: float = 10.0, window: int | None = None, norm_type: float = 2.0,
                 process_group=None) -> None:
        self.percentile = in_range("percentile", percentile, 0.0, 100.0, lo_open=True, hi_open=False)
        if window is not None:
            window = whole_number("window", window, fix="pass e.g. window=1000, or None to keep every norm")
        self.window = window
        self.norm_type = norm_order(norm_type)
        self.process_group = process_group  # FSDP1: the model's, for the norm over all shards
        self.steps = 0  # calls so far: a host-side count, known without reading the device
        self._history: torch.Tensor | None = None
        self.last_norm: torch.Tensor | None = None
        self.last_threshold: torch.Tensor | None = None

    @property
    def history(self) -> torch.Tensor:
        """The norms in the window so far, NaN where a norm was not finite (chronological unless windowed)."""
        if self._history is None:
            return torch.empty(0)
        return self._history[: min(self.steps, self._history.numel())]

    def _slot(self, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
        """Index to write this step's norm to, growing (or wrapping) the preallocated buffer. The
        buffer holds norms at least in float32 (a float64 model's in float64: its threshold at its
        own precision; a bfloat16 model's in float32, so the percentile is not rounded to 3 digits)."""
        if self._history is None:
            size = self.window or 1024
            self._history = torch.full((size,), float("nan"), device=device,
                                       dtype=torch.promote_types(dtype, torch.float32))
        self._history = self._history.to(device)  # a no-op, but after loading a checkpoint mapped elsewhere
        if self.window is not None:
            return self.steps % self.window
        if self.steps >= self._history.numel():
            grown = torch.full((2 * self._history.numel(),), float("nan"), device=self._history.device,
                               dtype=self._history.dtype)
            grown[: self._history.numel()] = self._history
            self._history = grown
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        """The norms seen and their count: save them with the optimizer's, so a resumed run clips to
        the percentile of its whole history, not of the norms since the restart."""
        return {"history": self.history.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` (of an AutoClip with the same window). A history of another
        length than this window keeps of that many steps came from another window: refused, as a
        windowed history (a ring) read as a whole one would leave NaN gaps, its next norms misplaced."""
        if set(state) != {"history", "steps"} or \
                len(state["history"]) != min(int(state["steps"]), self.window or int(state["steps"])):
            raise ConfigError(f"state with keys {sorted(state)} is not the state_dict() of an AutoClip with "
                              f"window={self.window}; pass what AutoClip.state_dict() returned")
        history, self.steps, self._history = state["history"], int(state["steps"]), None
        if len(history):
            self._history = torch.full((self.window or max(1024, 2 * len(history)),), float("nan"), dtype=history.dtype)
            self._history[: len(history)] = history

    @torch.no_grad()
    def __call__(self, params: Params) -> torch.Tensor:
        grads = grads_of(params)
        norm = total_norm(grads, self.norm_type, self.process_group)
        if not grads and self.process_group is None:
            # No gradient at all (a frozen part's optimizer, a step after a skipped backward): no
            # step happens, and a 0 in the history would drag the percentile towards 0, clipping
            # every later step to nothing. (Sharded, every rank must join the all-reduce above
            # and record alike, so an empty shard records.)
            self.last_norm = norm
            return norm
        slot = self._slot(norm.device, norm.dtype)
        value = norm.to(self._history.dtype)
        self._history[slot] = torch.where(torch.isfinite(value), value, torch.full_like(value, float("nan")))
        self.steps += 1
        threshold = torch.nanquantile(self.history, self.percentile / 100.0)  # linear, like np.percentile
        scale_(grads, clip_coef(norm, threshold.to(norm.dtype)))
        self.last_norm, self.last_threshold = norm, threshold
        return norm

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile:g}, window={self.window})"
