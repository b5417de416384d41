"""ZClip: clip the total gradient norm when it is an outlier against an EMA of its own mean and
variance (Kumar, Owen, Ashley, Shah 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv:2504.02507).

The algorithm is the reference ``zclip`` package's (v1.0), step for step:

* warm-up: the first `warmup_steps` norms are only collected; then mean = their mean and
  var = their population variance;
* after: z = (g − μ) / (σ + eps). If z > z_thresh the norm is a spike and the gradients are scaled
  to a threshold: ``"adaptive_scaling"`` (the default) μ + z_thresh·σ / (z / z_thresh), which pulls
  larger outliers down harder; ``"mean"`` μ; or, in ``mode="percentile"``, μ + z_thresh·σ whenever
  g exceeds it;
* the EMA is then updated with the clipped norm (the threshold on a spike, else g):
  μ ← α·μ + (1−α)·g', then σ² ← α·σ² + (1−α)·(g' − μ)² with the *new* μ, as the package does.

Deviations, on purpose: no fixed ``max_grad_norm`` cap by default (the package defaults to 1.0,
which would make it a plain clip_grad_norm_ for most models; pass ``max_grad_norm`` to get it),
everything stays on the device (the package reads the norm with ``.item()`` every step), and a
non-finite norm neither enters the warm-up buffer nor the EMA, nor is it scaled (left for
`gw.guard`).
"""

from __future__ import annotations

import torch

from gradwatch.errors import ConfigError
from gradwatch.remedies._common import (
    Params,
    clip_coef,
    grads_of,
    in_range,
    norm_order,
    positive_number,
    scale_,
    total_norm,
    whole_number,
)

_OPTIONS = {("zscore", "adaptive_scaling"), ("zscore", "mean"), ("percentile", None)}


class ZClip:
    """``ZClip()(params)`` scales spiking gradients down, returns the norm before clipping."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        *,
        eps: float = 1e-6,
        mode: str = "zscore",
        clip_option: str | None = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        process_group=None,
    ) -> None:
        self.alpha = in_range("alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=True)
        self.z_thresh = positive_number("z_thresh", z_thresh, fix="pass e.g. ZClip(z_thresh=2.5)")
        self.warmup_steps = whole_number("warmup_steps", warmup_steps, fix="pass e.g. ZClip(warmup_steps=25)")
        self.eps = positive_number("eps", eps, fix="pass e.g. ZClip(eps=1e-6), the default")
        if mode == "percentile":
            clip_option = None
        if (mode, clip_option) not in _OPTIONS:
            raise ConfigError(
                f"mode={mode!r}, clip_option={clip_option!r} is not a ZClip variant; use mode='zscore' with "
                "clip_option='adaptive_scaling' or 'mean', or mode='percentile'"
            )
        self.mode, self.clip_option = mode, clip_option
        self.clip_factor = positive_number("clip_factor", clip_factor, fix="pass e.g. ZClip(clip_factor=1.0), the default")
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.max_grad_norm = None if max_grad_norm is None else positive_number(
            "max_grad_norm", max_grad_norm, fix="pass None (no cap, the default) or e.g. 1.0")
        self.norm_type = norm_order(norm_type)
        self.process_group = process_group  # FSDP1: the model's, for the norm over all shards
        self._state: dict[str, torch.Tensor] | None = None
        self.last_norm: torch.Tensor | None = None

    def _init_state(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Statistics at least in float32: a float64 model's in float64 (float32 ones put a relative
        error of ~1e-6 into its thresholds), a bfloat16 model's in float32."""
        dtype = torch.promote_types(dtype, torch.float32)
        zero = torch.zeros((), device=device, dtype=dtype)
        return {
            "buffer": torch.zeros(self.warmup_steps, device=device, dtype=dtype),
            "count": torch.zeros((), dtype=torch.long, device=device),  # finite warm-up norms seen
            "mean": zero.clone(),
            "var": zero.clone(),
        }

    @property
    def mean(self) -> torch.Tensor | None:
        """EMA of the norm (0 during warm-up); a device tensor."""
        return None if self._state is None else self._state["mean"]

    @property
    def var(self) -> torch.Tensor | None:
        """EMA of the squared deviation (0 during warm-up); a device tensor."""
        return None if self._state is None else self._state["var"]

    def _threshold(self, g: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(is a spike, norm to clip to) for one finite norm g after warm-up."""
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            return g > threshold, threshold
        z = (g - mean) / (std + self.eps)
        if self.clip_option == "mean":
            threshold = mean
        else:
            threshold = (mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
        return z > self.z_thresh, threshold

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Warm-up buffer, count, mean and var: save them with the optimizer's, so a resumed run
        neither warms up again nor forgets the statistics of its gradient norm."""
        return {} if self._state is None else {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume from `state_dict()` (of a ZClip with the same warmup_steps); moved to the
        gradients' device at the next call."""
        if state and (set(state) != {"buffer", "count", "mean", "var"}
                      or state["buffer"].numel() != self.warmup_steps):
            raise ConfigError(f"state with keys {sorted(state)} is not the state_dict() of a ZClip with "
                              f"warmup_steps={self.warmup_steps}; pass what ZClip.state_dict() returned")
        self._state = {k: v.clone() for k, v in state.items()} or None

    @torch.no_grad()
    def __call__(self, params: Params) -> torch.Tensor:
        grads = grads_of(params)
        norm = total_norm(grads, self.norm_type, self.process_group)
        if not grads and self.process_group is None:
            # No gradient at all (a frozen part's optimizer, a step after a skipped backward): no
            # step happens; a 0 would enter the warm-up mean or pull the EMA down, making every
            # later step look like a spike.
            self.last_norm = norm
            return norm
        if self._state is None:
            self._state = self._init_state(norm.device, norm.dtype)
        elif self._state["mean"].device != norm.device:  # loaded from a checkpoint mapped elsewhere
            self._state = {k: v.to(norm.device) for k, v in self._state.items()}
        s = self._state
        g = norm.to(s["mean"].dtype)
        finite = torch.isfinite(g)
        g0 = torch.where(finite, g, torch.zeros_like(g))  # keeps NaN out of every blend below
        warm = s["count"] < self.warmup_steps  # still warming up, before this step

        # Warm-up: store the norm in the next free slot; initialise the EMA when the buffer is full.
        collect = warm & finite
        slot = s["count"].clamp(max=self.warmup_steps - 1).view(1)
        s["buffer"].index_put_((slot,), torch.where(collect, g0, s["buffer"][slot]))
        s["count"] += collect.long()
        just_full = warm & (s["count"] == self.warmup_steps)
        buf_mean = s["buffer"].mean()
        buf_var = (s["buffer"] - buf_mean).square().mean()

        # After warm-up: spike test, clip target, EMA update with the clipped norm.
        std = s["var"].sqrt()
        spike, threshold = self._threshold(g0, s["mean"], std)
        spike = spike & finite & ~warm
        effective = torch.where(spike, threshold, g0)
        update = finite & ~warm
        if self.skip_update_on_spike:
            update = update & ~spike
        new_mean = self.alpha * s["mean"] + (1 - self.alpha) * effective
        new_var = self.alpha * s["var"] + (1 - self.alpha) * (effective - new_mean).square()
        s["mean"] = torch.where(just_full, buf_mean, torch.where(update, new_mean, s["mean"]))
        s["var"] = torch.where(just_full, buf_var, torch.where(update, new_var, s["var"]))

        target = torch.where(spike, threshold, torch.full_like(g0, float("inf")))
        if self.max_grad_norm is not None:
            target = target.clamp(max=self.max_grad_norm)
        # clip only where the norm is above the target, as the package does (coef 1 otherwise)
        coef = torch.where(g0 > target, clip_coef(norm, target.to(norm.dtype)), torch.ones_like(norm))
        scale_(grads, coef)
        self.last_norm = norm
        return norm

    def __repr__(self) -> str:
        return (f"ZClip(alpha={self.alpha:g}, z_thresh={self.z_thresh:g}, warmup_steps={self.warmup_steps}, "
                f"mode={self.mode!r}, clip_option={self.clip_option!r})")

