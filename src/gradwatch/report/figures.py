"""The report's pictures, drawn with matplotlib's Agg renderer into base64 PNG (no pyplot: no
global state, no GUI). Text from user code is drawn with mathtext off, so a `$` in a layer name
is just a character."""

from __future__ import annotations

import base64
import io
import os
import warnings

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradwatch.report.display import MAX_COLUMNS, MAX_POINTS, Blocks, recorded_rows, reduce_blocks
from gradwatch.store.series import RunSeries

SEVERITY_COLOURS = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}
NONFINITE_COLOUR = "#e00070"
MISSING_COLOUR = "#dddddd"
ZERO_COLOUR = "#000000"  # exactly 0 (no gradient at all, no update): recorded, unlike grey
TEXT = {"parse_math": False}
DPI = 100


def png(fig: Figure) -> str:
    """The figure as a base64 PNG string. A layer name in a script the font lacks (CJK, emoji) is
    drawn as boxes, said once per picture and glyph by matplotlib: eight warnings on stderr for a
    6-layer run, naming this file; the page's tables have the names whole."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def short_name(name: str, width: int = 28) -> str:
    """A layer name that fits a tick label: its last dotted parts after an ellipsis
    (`bert.encoder.layer.0.attention.self.query` -> `…0.attention.self.query`), or its last
    characters when those parts are under half the width (a 200-character name ending in `.0` was
    `…0`). Long labels would take the plot's height and cut its axis title; the page's tables keep
    the full names."""
    if len(name) <= width:
        return name
    parts, kept = name.split("."), ""
    while parts and len(parts[-1]) + len(kept) + 2 <= width:
        kept = parts.pop() + ("." + kept if kept else "")
    return "…" + (kept if 2 * len(kept) >= width else name[-(width - 1):])


def short_names(names: list[str], width: int = 28) -> list[str]:
    """`short_name` of each, made to tell the layers apart: names that shorten to the same label
    lose the beginning they share instead of their own (`…0.attention.o…put.LayerNorm`,
    `encoderxxxxxx…block.0.linear`). Keeping the first and last characters of the whole name drew
    BERT's `bert.encoder.layer.{0,1}.attention.output.LayerNorm` both as `bert.encoder.…tput.LayerNorm`."""
    labels = {n: short_name(n, width) for n in names}
    cut = dict.fromkeys(labels, 0)  # how much of each name's beginning its label leaves out
    for _ in range(8):  # each round cuts a still-colliding group further: a few rounds at most
        groups: dict[str, list[str]] = {}
        for name, label in labels.items():
            groups.setdefault(label, []).append(name)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            break
        for group in clashes:
            shared = len(os.path.commonprefix(group))
            at = group[0].rfind(".", 0, shared) + 1  # at a dotted part where that says more
            at = at if at > max(cut[n] for n in group) else shared
            for name in group:
                cut[name], labels[name] = at, _apart(name, at, width)
    return [labels[n] for n in names]


def _apart(name: str, cut: int, width: int) -> str:
    """`name` without its first `cut` characters (said by `…`), its middle elided to fit `width`:
    the part where it differs from its look-alikes comes first."""
    lead, rest = ("…" if cut else ""), name[cut:]
    if len(lead) + len(rest) <= width:
        return lead + rest
    room = width - len(lead) - 1
    return f"{lead}{rest[:room // 2]}…{rest[len(rest) - (room - room // 2):]}"


def _layer_ticks(ax, axis: str, names: list[str], limit: int = 40) -> None:
    stride = max(1, -(-len(names) // limit))
    ticks = np.arange(0, len(names), stride)
    short = short_names(names)
    labels = [short[i] for i in ticks]
    size = 8 if len(ticks) <= 20 else 6  # small type only where 40 names share the axis
    if axis == "x":
        turn = max(map(len, labels)) > 3  # short names ("0", "fc1") stay upright
        ax.set_xticks(ticks, labels, rotation=60 if turn else 0, ha="right" if turn else "center", fontsize=size, **TEXT)
    else:
        ax.set_yticks(ticks, labels, fontsize=size, **TEXT)


def gradient_flow(run: RunSeries, steps: list[int], cols: list[int]) -> Figure:
    """Per-layer gradient norm, input → output, one line per chosen step."""
    names = [run.layers[c].name for c in cols]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    row_of = {int(s): i for i, s in enumerate(run.steps)}
    x = np.arange(len(cols))
    g = run.metrics["grad_norm"]
    zero_said = False  # one legend entry for the zero marks of every step
    for s in steps:
        y = g[row_of[s], cols]
        finite = np.where(np.isfinite(y) & (y > 0), y, np.nan)
        line, = ax.plot(x, finite, marker="o", ms=3, lw=1.2, label=f"step {s}")
        bad = np.flatnonzero(np.isinf(y))
        if len(bad):
            ax.plot(x[bad], np.full(len(bad), 1.0), "x", color=NONFINITE_COLOUR, transform=ax.get_xaxis_transform(),
                    clip_on=False, label=f"non-finite at step {s}")
        zero = np.flatnonzero(y == 0)  # no place on a log axis: marked along the bottom, not left out
        if len(zero):
            ax.plot(x[zero], np.zeros(len(zero)), "v", ms=4, color=line.get_color(), transform=ax.get_xaxis_transform(),
                    clip_on=False, label="_" if zero_said else "0, or below float32's range (in the step's colour)")
            zero_said = True
    ax.set_yscale("log")
    _layer_ticks(ax, "x", names)
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("gradient norm ‖∂L/∂W‖\n(before clipping)")  # one line was cut at the top
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=7, ncols=2)
    return fig


def column_edges(blocks: Blocks, end: float | None = None) -> np.ndarray:
    """x edges of the heat map's cells: each block from its first step to the next block's (a
    metric sampled every 10th step is 10 steps wide per cell, not spread over the run). The last
    cell stops at `end` (one past the run's last step): a metric sampled at steps 0 and 40 of a
    50-step run drew its last cell over 40-80, and the picture ran on to a step 80 that never was."""
    steps = np.asarray(blocks.steps, dtype=float)
    if len(steps) == 0:
        return np.array([0.0, 1.0])
    width = np.diff(steps)[-1] if len(steps) > 1 else float(blocks.size)
    last = steps[-1] + width
    if end is not None and steps[-1] < end < last:
        last = float(end)
    return np.append(steps, last)


def heatmap(run: RunSeries, metric: str, cols: list[int], label: str) -> tuple[Figure, Blocks]:
    """log10 of `metric`, layers (input at the top) × steps, each cell a block maximum."""
    values = run.metrics[metric][:, cols]
    rows = recorded_rows(values)
    blocks, v = reduce_blocks(run.steps[rows], values[rows], MAX_COLUMNS, "max")
    names = [run.layers[c].name for c in cols]
    fig = Figure(figsize=(10, min(9.0, max(2.6, 1.4 + 0.035 * len(cols)))), layout="constrained")
    ax = fig.subplots()
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(np.isfinite(v) & (v > 0), np.log10(np.where(v > 0, v, 1.0)), np.nan)
    finite = logv[np.isfinite(logv)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    end = float(run.steps[-1]) + 1 if len(run.steps) else None
    x, y = column_edges(blocks, end), np.arange(len(cols) + 1) - 0.5  # cells at the steps recorded
    cmap = colormaps["viridis"].with_extremes(bad=MISSING_COLOUR)
    im = ax.pcolormesh(x, y, np.ma.masked_invalid(logv.T), cmap=cmap, vmin=lo, vmax=hi)
    for where, colour in ((np.isposinf(v).T, NONFINITE_COLOUR), ((v == 0).T, ZERO_COLOUR)):
        if where.any():
            ax.pcolormesh(x, y, np.ma.masked_where(~where, np.ones(where.shape)), cmap=ListedColormap([colour]))
    ax.set_facecolor(MISSING_COLOUR)  # steps with no cell at all (nothing sampled there) read as not recorded
    ax.set_ylim(len(cols) - 0.5, -0.5)  # input at the top
    if len(run.steps):  # every heat map spans the whole run (a sampled metric's too), so they line up
        ax.set_xlim(float(run.steps[0]), max(float(run.steps[-1]) + 1, x[-1]))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at step 0.2
    fig.colorbar(im, ax=ax, label=f"log10 {label}", fraction=0.03, pad=0.01)
    _layer_ticks(ax, "y", names)
    ax.set_xlabel("step")
    return fig, blocks


def loss_curve(run: RunSeries, marks: list[tuple[int, int, str]]) -> tuple[Figure, Blocks]:
    """The loss (block median with the block's min–max band) and the findings' first steps,
    numbered as in the findings list. `marks`: (number, step, severity)."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.subplots()
    keep = np.isfinite(run.loss)
    steps, loss = run.steps[keep], run.loss[keep]
    blocks, mid = reduce_blocks(steps, loss, MAX_POINTS, "median")
    if blocks.size > 1:
        _, lo = reduce_blocks(steps, loss, MAX_POINTS, "min")
        _, hi = reduce_blocks(steps, loss, MAX_POINTS, "max")
        ax.fill_between(blocks.steps, lo, hi, color="#90caf9", alpha=0.5, lw=0, label="block min–max")
    few = len(blocks.steps) <= 60  # a line alone: a one-step run (or one finite loss) drew nothing at all
    ax.plot(blocks.steps, mid, color="#0d47a1", lw=1.2, marker="o" if few else None, ms=3,
            label="loss" if blocks.size == 1 else "loss (block median)")
    if len(loss) and loss.min() > 0 and loss.max() / loss.min() > 20:
        ax.set_yscale("log")
    bad = run.steps[np.isinf(run.loss)]  # non-finite: marked along the top, the axis runs on to them
    if len(bad):
        ax.plot(bad, np.full(len(bad), 1.0), "x", color=NONFINITE_COLOUR, transform=ax.get_xaxis_transform(),
                clip_on=False, label="non-finite loss")
        ax.set_xlim(min(run.steps[0], blocks.steps[0] if len(blocks.steps) else bad[0]), run.steps[-1] + 1)
    for number, step, severity in marks:
        colour = SEVERITY_COLOURS.get(severity, "black")
        ax.axvline(step, color=colour, ls="--", lw=1)
        ax.text(step, 1.0, f" {number}", color=colour, fontsize=8, va="bottom", transform=ax.get_xaxis_transform(),
                **TEXT)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(run.steps) and run.steps[-1] == run.steps[0]:  # one step: the locator ticked -0.045 ... 0.045
        ax.set_xlim(run.steps[0] - 0.5, run.steps[0] + 0.5)
        ax.set_xticks([run.steps[0]])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return fig, blocks


def activation_bars(names: list[str], dead: np.ndarray, saturated: np.ndarray) -> Figure:
    """Dead and saturated fractions per activation layer (their last recorded values)."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ax.bar(x - 0.2, np.nan_to_num(dead, nan=0.0, posinf=1.0), 0.4, label="dead (never active in the batch)",
           color="#6d4c41")
    ax.bar(x + 0.2, np.nan_to_num(saturated, nan=0.0, posinf=1.0), 0.4, label="saturated", color="#f9a825")
    ax.set_ylim(0, 1.05)
    _layer_ticks(ax, "x", names)
    ax.set_xlabel("activation layer (input → output)")
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7)
    return fig


def time_profile(steps: np.ndarray, table: np.ndarray, layer: str) -> Figure:
    """A recurrent layer's BPTT profile: the norm of the loss gradient w.r.t. its input at each
    time step t (log axis), one line per chosen profiled step. A straight falling line to the left
    is a gradient that shrinks by a constant factor per time step (vanishing through time)."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    t = np.arange(table.shape[1])
    zero_said = False
    for s, y in zip(steps, table):
        shown = np.where(np.isfinite(y) & (y > 0), y, np.nan)
        line, = ax.plot(t, shown, lw=1.2, label=f"step {int(s)}")
        zero = np.flatnonzero(y == 0)
        if len(zero):
            ax.plot(t[zero], np.zeros(len(zero)), "v", ms=4, color=line.get_color(), transform=ax.get_xaxis_transform(),
                    clip_on=False, label="_" if zero_said else "0, or below float32's range (in the step's colour)")
            zero_said = True
        bad = np.flatnonzero(np.isinf(y))  # the store keeps a measured NaN as +inf; NaN: no such t
        if len(bad):
            ax.plot(t[bad], np.ones(len(bad)), "x", color=NONFINITE_COLOUR, transform=ax.get_xaxis_transform(),
                    clip_on=False, label=f"non-finite at step {int(s)}")
    if np.any(np.isfinite(table) & (table > 0)):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"time step t of the sequence ({layer})", **TEXT)
    ax.set_ylabel("‖∂L/∂x_t‖")
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=7, ncols=2)
    return fig
