"""The `gradwatch` command: a thin shell over the library.

Each subcommand lives in its own `*_cmd.py` module exposing `register(subparsers)`, which adds a
parser whose `func(args) -> int` calls one library function. Library errors (`GradwatchError`)
become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gradwatch.errors import GradwatchError

COMMANDS = ("run", "show", "diagnose", "probe", "fix", "lab", "report", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Make vanishing and exploding gradients visible, explained, predicted and fixed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gradwatch.cli.{name}_cmd")
        except ModuleNotFoundError as exc:  # a command still being built is simply absent
            if exc.name != f"gradwatch.cli.{name}_cmd":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradwatchError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
