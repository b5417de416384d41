"""gradwatch lab: run the classic vanishing/exploding-gradient experiments and write their pages."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gradwatch import lab, runner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lab",
        description="Run seeded experiments that check the classic claims about vanishing and exploding "
                    "gradients, measured with gradwatch itself. Each writes PNG figures, results.csv and a page "
                    "(index.md, index.html) into OUT/NAME/. Exit code 1 if any check fails. "
                    f"Experiments: {', '.join(lab.NAMES)}.")
    p.add_argument("name", metavar="NAME", help="an experiment (any case), 'all', or 'list' to show them")
    p.add_argument("--quick", action="store_true", help="small sizes (all ten in 1-2 minutes of CPU time) instead of the full "
                                                    "ones (all ten in about an hour)")
    p.add_argument("--out", default="lab-out", help="directory for the pages (default: lab-out)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gradwatch.lab.page import verdict  # matplotlib: loaded when an experiment runs, not for --help

    console = Console()
    name = args.name.lower()
    if name == "list":
        table = Table(show_lines=False)
        table.add_column("name")
        table.add_column("claim")
        for exp in lab.all_experiments():
            table.add_row(exp.name, exp.claim)
        console.print(table)
        return 0
    exps = lab.all_experiments() if name == "all" else [lab.get(name)]
    out = runner.output_dir(args.out)
    done = lab.run_many(exps, args.quick, out)
    table = Table(title=f"gradwatch lab ({'quick' if args.quick else 'full'})")
    for col in ("experiment", "verdict", "checks passed", "seconds"):
        table.add_column(col)
    for exp, res in done:
        v = verdict(res)
        table.add_row(exp.name, f"[{'green' if v == 'PASS' else 'red'}]{v}[/]",
                      f"{sum(c.passed for c in res.checks)}/{len(res.checks)}", f"{res.seconds:.1f}")
    console.print(table)
    for exp, res in done:
        for c in res.checks:
            if not c.passed:
                console.print(f"[red]FAIL[/] {exp.name}: {c.description}", markup=True, highlight=False)
    index = out / ("index.html" if len(done) > 1 else f"{done[0][0].name}/index.html")
    if index.is_file():  # (an experiment whose folder could not be written has no page)
        console.print(f"pages: {index}", highlight=False)
    return 0 if all(res.passed for _, res in done) else 1
