"""The product pieces the lab measures with, each behind one function: the lab uses gradwatch's
own clipping, recurrent probe and diagnose, so it is an end-to-end test of the product."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import torch

from gradwatch.diagnose import diagnose
from gradwatch.probe.recurrent import bptt_profile as probe_profile
from gradwatch.remedies.clip import ZClip, clip_norm, clip_value
from gradwatch.store.series import RunSeries

BPTT_SOURCE = "gradwatch.probe.recurrent"


def clippers() -> SimpleNamespace:
    """clip_norm(params, max_norm), clip_value(params, v), ZClip(...) -> callable(params)."""
    return SimpleNamespace(clip_norm=clip_norm, clip_value=clip_value, ZClip=ZClip, source="gradwatch.remedies.clip")


def bptt_profile(cell, xs: torch.Tensor, h0: torch.Tensor) -> list[float]:
    """‖∂L_T/∂h_k‖ / ‖∂L_T/∂h_T‖ for T-k = 0..T, with L_T = <r, h_T> for a random unit direction r
    per sample (gradwatch.probe's recurrent probe, seeded)."""
    return list(probe_profile(cell, xs, h0, torch.Generator().manual_seed(0))[0])


def finding_kinds(series: RunSeries) -> set[str]:
    """The kinds of finding gradwatch.diagnose reports for a run."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return {f.kind for f in diagnose(series)}


def kinds_text(kinds: set[str]) -> str:
    """Finding kinds for a table cell: sorted, or "none"."""
    return ", ".join(sorted(kinds)) or "none"
