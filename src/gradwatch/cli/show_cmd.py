"""gradwatch show: a per-layer table of what a run recorded."""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradwatch.cli import Reading, say_which_store
from gradwatch.errors import ConfigError
from gradwatch.store import end_note
from gradwatch.store.summary import summarise
from gradwatch.store.schema import LAYER_COLUMNS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show",
                       description="Print, for each layer in forward order, the first, last, min and max of each "
                                   "recorded metric. --metric grad_norm gives one row per layer (a deep model's "
                                   "table is otherwise up to ten rows a layer).")
    p.add_argument("run", help="run directory or .sqlite store")
    p.add_argument("--metric", help="only these metrics, comma-separated (e.g. grad_norm,update_ratio); "
                                    f"names: {', '.join(LAYER_COLUMNS)}")
    p.set_defaults(func=main)


def _fmt(v: float) -> str:
    # the store keeps a measured NaN as +inf: either way the value was not finite
    return f"{v:.3g}" if np.isfinite(v) else "non-finite"


def _metrics(text: str | None) -> tuple[str, ...]:
    if not text:
        return LAYER_COLUMNS
    wanted = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in wanted if m not in LAYER_COLUMNS]
    if unknown or not wanted:
        raise ConfigError(f"--metric={text!r}: unknown metric {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(LAYER_COLUMNS)}")
    return wanted


def _width(series, metrics: tuple[str, ...]) -> int:
    """Columns the table needs with nothing folded: its cells and 3 per column of borders."""
    name = max([len(l.name) for l in series.layers] + [5])
    kind = max([len(l.type) for l in series.layers] + [4])
    return name + kind + max(map(len, metrics)) + 4 * 10 + 3 * 7 + 1


def main(args: argparse.Namespace) -> int:
    metrics = _metrics(getattr(args, "metric", None))
    say_which_store(args.run)
    # streamed: the ten metrics of a 50k-step x 480-layer run as arrays (`read_run`) were 1.9 GB
    series = summarise(args.run, metrics, progress=Reading(args.run))
    note = end_note(series.meta, int(series.steps[-1]) if len(series.steps) else None)
    # names and the path as Text, never markup: a module named `[/]x` was a MarkupError traceback,
    # and `a[b]x` showed as `ax`
    n = len(series.steps)
    table = Table(title=Text(f"{args.run}: {n:,} step{'s' * (n != 1)}" + (" (partial)" if note else "")),
                  show_lines=False)
    # Names are never cut: on an 80-column pipe `update_ratio` was shown as `update_rat…` and a
    # long layer name lost its end (the part that tells layers apart); a layer name folds instead.
    table.add_column("layer", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("metric", no_wrap=True, min_width=max(map(len, metrics)))
    for col in ("first", "last", "min", "max"):
        table.add_column(col, justify="right", no_wrap=True, min_width=10)
    for i, layer in enumerate(series.layers):
        shown = False
        for metric in metrics:
            first, last, lo, hi = series.values[metric][i]
            if np.isnan(first):  # never recorded
                continue
            lo, hi = (_fmt(lo), _fmt(hi)) if not np.isnan(lo) else ("-", "-")
            table.add_row(Text(layer.name if not shown else ""), Text(layer.type if not shown else ""), metric,
                          _fmt(first), _fmt(last), lo, hi)
            shown = True
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table needs (rich assumed 80 columns)
        console = Console(width=max(console.width, _width(series, metrics)))
    console.print(table)
    loss = series.loss[~np.isnan(series.loss)]
    if len(loss):
        finite = loss[np.isfinite(loss)]
        lowest = _fmt(finite.min()) if len(finite) else "-"
        Console().print(f"loss: first {_fmt(loss[0])}, last {_fmt(loss[-1])}, min {lowest}")
    if note:  # last, where a long table ends on the screen
        Console(highlight=False, soft_wrap=True).print(f"partial run: {note}", markup=False)
    return 0
