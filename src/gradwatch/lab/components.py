"""The product pieces the lab measures with, each behind one function.

Where a gradwatch module provides the quantity (remedies.clip, probe, diagnose) the lab uses it, so
the lab is an end-to-end test of the product; while a module is absent (it is built separately),
the function computes the same quantity directly with torch, and says so in `sources()`.
"""

from __future__ import annotations

import importlib
import math
import warnings
from types import SimpleNamespace

import numpy as np
import torch

from gradwatch.store.series import RunSeries


def clippers() -> SimpleNamespace:
    """clip_norm(params, max_norm), clip_value(params, v), ZClip(...) -> callable(params)."""
    try:
        from gradwatch.remedies.clip import ZClip, clip_norm, clip_value
        return SimpleNamespace(clip_norm=clip_norm, clip_value=clip_value, ZClip=ZClip, source="gradwatch.remedies.clip")
    except ImportError:
        return SimpleNamespace(clip_norm=torch.nn.utils.clip_grad_norm_, clip_value=torch.nn.utils.clip_grad_value_,
                               ZClip=_ZClip, source="torch.nn.utils + lab fallback ZClip")


class _ZClip:
    """Fallback ZClip (Kumar et al. 2025), z-score mode with adaptive scaling: after a warm-up,
    a total norm g with z = (g - mu)/sigma > z_thresh is scaled to mu + z_thresh^2/z * sigma; the
    EMA of mean and variance is then updated with the clipped norm."""

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 max_grad_norm: float | None = None):
        self.alpha, self.z_thresh, self.warmup = alpha, z_thresh, warmup_steps
        self.max_grad_norm = max_grad_norm
        self.buffer: list[float] = []
        self.mean = self.var = None

    def __call__(self, params) -> float:
        params = [p for p in params if p.grad is not None]
        g = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        target = g
        if self.mean is None:
            if math.isfinite(g):
                self.buffer.append(g)
            if len(self.buffer) == self.warmup:
                self.mean, self.var = float(np.mean(self.buffer)), float(np.var(self.buffer))
        elif math.isfinite(g):
            std = math.sqrt(self.var)
            z = (g - self.mean) / (std + 1e-6)
            if z > self.z_thresh:
                target = self.mean + self.z_thresh ** 2 / z * std
            self.mean = self.alpha * self.mean + (1 - self.alpha) * target
            self.var = self.alpha * self.var + (1 - self.alpha) * (target - self.mean) ** 2
        if self.max_grad_norm is not None:
            target = min(target, self.max_grad_norm)
        if math.isfinite(g) and target < g:
            for p in params:
                p.grad.mul_(target / g)
        return g


def bptt_profile(cell, xs: torch.Tensor, h0: torch.Tensor, seed: int = 0) -> list[float]:
    """‖∂L_T/∂h_k‖ / ‖∂L_T/∂h_T‖ for T-k = 0..T, with L_T = <r, h_T> for a random unit direction r
    per sample (gradwatch.probe's recurrent probe; the direct computation while it is absent)."""
    gen = torch.Generator().manual_seed(seed)
    try:
        from gradwatch.probe.recurrent import bptt_profile as probe_profile
    except ImportError:
        probe_profile = None
    if probe_profile is not None:
        return list(probe_profile(cell, xs, h0, gen)[0])
    states = [h0.detach().clone().requires_grad_(True)]
    with torch.enable_grad():
        for x in xs:
            states.append(cell(x, states[-1]))
        r = torch.randn(states[-1].shape, generator=gen)
        r = r / r.norm(dim=-1, keepdim=True)
        grads = torch.autograd.grad((r * states[-1]).sum(), states)
    norms = [float(g.double().norm()) for g in grads][::-1]
    return [n / norms[0] for n in norms]


def finding_kinds(series: RunSeries) -> set[str] | None:
    """The kinds of finding gradwatch.diagnose reports for a run (None if diagnose is absent)."""
    try:
        from gradwatch.diagnose import diagnose
    except ImportError:
        return None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return {f.kind for f in diagnose(series)}


def kinds_text(kinds: set[str] | None) -> str:
    """Finding kinds for a table cell: sorted, "none", or "–" when diagnose is absent."""
    if kinds is None:
        return "–"
    return ", ".join(sorted(kinds)) or "none"


def sources() -> dict[str, str]:
    """Which implementation each measurement used (shown on the pages)."""
    found = {}
    for label, module, fallback in (("bptt profile", "gradwatch.probe.recurrent", "lab fallback (torch autograd)"),
                                    ("diagnose", "gradwatch.diagnose", "absent")):
        try:
            importlib.import_module(module)
            found[label] = module
        except ImportError:
            found[label] = fallback
    return {"clipping": clippers().source, **found}
