"""Figures shared by several experiments: loss curves and per-layer profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradwatch.diagnose.signals import total_grad_norm
from gradwatch.lab.page import figure, save
from gradwatch.lab.train import Run


def smooth(steps: np.ndarray, values: np.ndarray, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Running mean over `window` values, each placed at the last step of its window. A run with
    fewer values than the window (one that diverged early) is drawn unsmoothed at its own steps:
    its points must line up with its divergence marker."""
    if len(values) < window:
        return steps, values
    kernel = np.ones(window) / window
    return steps[window - 1:], np.convolve(values, kernel, mode="valid")


BLEW_UP = 10.0  # a finished run whose smoothed loss ends above this multiple of its start blew up


def loss_curves(ax, runs: list[Run], log: bool = True, window: int = 10) -> None:
    """Smoothed training losses. A diverged run is marked at its step (dotted line, and in the legend),
    and the y range is that of the runs that neither diverged nor blew up (a finite loss ending above
    BLEW_UP × its start, as ZClip's 1e19 in `lab clipping`, is named in the legend with its peak): a
    blow-up to 1e30 would otherwise flatten every other curve into one line at the bottom, hiding
    whether they learned."""
    kept = []
    for run in runs:
        finite = np.flatnonzero(np.isfinite(run.losses))
        x, y = smooth(finite, run.losses[finite], window)
        blew_up = run.diverged_at is None and len(y) > 1 and y[-1] > BLEW_UP * abs(y[0])
        label = (f"{run.label} (non-finite at step {run.diverged_at})" if run.diverged_at is not None else
                 f"{run.label} (blew up: loss to {float(np.max(y)):.1e})" if blew_up else run.label)
        line, = ax.plot(x, y, label=label)
        if run.diverged_at is not None:
            ax.axvline(run.diverged_at, color=line.get_color(), ls=":", lw=1)
        elif len(y) and not blew_up:
            kept.append(y)
    if log:
        ax.set_yscale("log")
    if kept and len(kept) < len(runs):
        low, high = min(float(np.min(y)) for y in kept), max(float(np.max(y)) for y in kept)
        if log and low > 0:
            ax.set_ylim(low / 2, high * 10)
        else:
            ax.set_ylim(low - 0.1 * (high - low), high + (high - low))
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {window} steps)")
    ax.legend(fontsize=7)


def layer_profile(ax, names: list[str], series: dict[str, np.ndarray], ylabel: str, title: str = "") -> None:
    x = np.arange(len(names))
    for label, values in series.items():
        ax.plot(x, values, marker="o", ms=3, label=label)
    ax.set_yscale("log")
    step = max(1, len(names) // 12)
    ax.set_xticks(x[::step], names[::step], rotation=45, fontsize=7)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def losses_and_profile(out: Path, name: str, runs: list[Run], names: list[str], profile: dict[str, np.ndarray],
                       ylabel: str, title: str) -> Path:
    """The common two-panel figure: loss curves beside a per-layer profile."""
    fig, (a, b) = figure(2)
    loss_curves(a, runs)
    layer_profile(b, names, profile, ylabel, title)
    return save(fig, out, name)


def losses_and_grad_norms(out: Path, name: str, runs: list[Run], ylabel: str = "total gradient norm (watch)") -> Path:
    """Loss curves beside the total gradient norm of every step, as the watch recorded it."""
    fig, (a, b) = figure(2)
    loss_curves(a, runs)
    for r in runs:
        b.plot(r.series.steps, total_grad_norm(r.series), label=r.label, lw=1)
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel(ylabel)
    b.legend(fontsize=7)
    return save(fig, out, name)
