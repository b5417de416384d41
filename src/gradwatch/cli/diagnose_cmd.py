"""gradwatch diagnose: what is wrong, where, since when, why, and what to change."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from gradwatch.cli import Reading, say, say_which_store
from gradwatch.diagnose import diagnose
from gradwatch.store import RunSeries, partial_note, read_run

if TYPE_CHECKING:
    from gradwatch.fix.names import Names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose",
                       description="Run the rules over a recorded run and print the findings "
                                   "(kind, first step, layers, evidence, causes, remedies).")
    p.add_argument("run", help="run directory or .sqlite store")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gradwatch.fix.names import in_script_names  # (here: the parsers are built without importing torch)

    say_which_store(args.run)
    progress = Reading(args.run)
    series = read_run(args.run, progress=progress, compact=True)
    if progress.spoke:  # a long run: the rules take a while on it too
        say(f"diagnosing {len(series.steps):,} steps x {len(series.layers)} layers")
    findings = diagnose(series)
    note = partial_note(series)
    if args.json:
        if note:  # the JSON stays a list of findings: the note goes to stderr
            print(f"gradwatch: partial run: {note}", file=sys.stderr)
        print(json.dumps([f.to_dict() for f in findings], indent=2, default=float))
        return 0
    # into a pipe or file, a finding's sentences stay whole lines (rich would wrap them at 80 columns)
    console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
    if note:
        console.print(f"partial run: {note} (the findings are of the steps stored)", markup=False, soft_wrap=True)
    if not findings:
        console.print(f"{args.run}: no findings", markup=False)
        return 0
    style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    names = _script_names(series)
    later = tuple(m for m in series.meta.get("models") or () if m)  # (the first model's layers have no prefix)
    for f in findings:
        where = ", ".join(f.layers[:6]) + (" ..." if len(f.layers) > 6 else "")
        # layer names as text, never markup: a module named `[/]x` was a MarkupError traceback
        console.print(Text.assemble((f.severity.upper(), style[f.severity]),
                                    f" {f.kind} since step {f.first_step}" + (f" in {where}" if where else "")))
        console.print(f"  {f.message}", markup=False)
        if f.evidence:
            console.print("  evidence: " + ", ".join(f"{k}={_fmt(v)}" for k, v in f.evidence.items()), markup=False)
        for i, cause in enumerate(f.causes, 1):
            console.print(f"  cause {i}: {cause}", markup=False)
        for r in f.remedies:
            console.print(f"  fix: {r.action}", markup=False)
            # code to paste: each line of a block indented, never wrapped (a wrapped comment is a syntax error)
            code = r.code if names is None else in_script_names(r.code, names, f.layers, later)
            console.print(textwrap.indent(code, "       "), markup=False, soft_wrap=True)
    return 0


def _script_names(series: RunSeries) -> Names | None:
    """The names the run's script gives its model and optimizer, read from its source where it is
    still at the path it ran from (relative to here), as fix reads them; generic where it is not
    (the code stays as written), None for a run with no command."""
    from gradwatch.diagnose.advice import Context
    from gradwatch.fix.names import script_names

    argv = [str(a) for a in series.meta.get("command") or series.meta.get("argv") or []]
    return script_names([sys.executable, *argv], Context(series)) if argv else None


def _fmt(v: object, shown: int = 8) -> str:
    """3 significant digits, inside dicts and lists too; a long one (a value per layer) is cut to
    its first `shown` entries (all of them are in --json)."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        items = [f"{k}: {_fmt(x)}" for k, x in list(v.items())[:shown]]
        return "{" + ", ".join(items) + (f", ... {len(v) - shown} more" if len(v) > shown else "") + "}"
    if isinstance(v, (list, tuple)):
        items = [_fmt(x) for x in list(v)[:shown]]
        return "[" + ", ".join(items) + (f", ... {len(v) - shown} more" if len(v) > shown else "") + "]"
    return str(v)
