"""gradwatch show: a per-layer table of what a run recorded."""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from gradwatch.store import read_run
from gradwatch.store.schema import LAYER_COLUMNS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="per-layer table (first/last/min/max of each metric) of a run",
                       description="Print, for each layer in forward order, the first, last, min and max of each recorded metric.")
    p.add_argument("run", help="run directory or .sqlite store")
    p.set_defaults(func=main)


def _fmt(v: float) -> str:
    # the store keeps a measured NaN as +inf: either way the value was not finite
    return f"{v:.3g}" if np.isfinite(v) else "non-finite"


def main(args: argparse.Namespace) -> int:
    series = read_run(args.run)
    table = Table(title=f"{args.run}: {len(series.steps)} steps", show_lines=False)
    for col in ("layer", "type", "metric", "first", "last", "min", "max"):
        table.add_column(col, justify="right" if col in ("first", "last", "min", "max") else "left")
    for layer in series.layers:
        shown = False
        for metric in LAYER_COLUMNS:
            _, values = series.series(layer.name, metric)
            if not len(values):
                continue
            finite = values[np.isfinite(values)]
            lo, hi = (_fmt(finite.min()), _fmt(finite.max())) if len(finite) else ("-", "-")
            table.add_row(layer.name if not shown else "", layer.type if not shown else "", metric,
                          _fmt(values[0]), _fmt(values[-1]), lo, hi)
            shown = True
    Console().print(table)
    loss = series.loss[~np.isnan(series.loss)]
    if len(loss):
        finite = loss[np.isfinite(loss)]
        lowest = _fmt(finite.min()) if len(finite) else "-"
        Console().print(f"loss: first {_fmt(loss[0])}, last {_fmt(loss[-1])}, min {lowest}")
    return 0
