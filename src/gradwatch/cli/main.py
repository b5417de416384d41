"""The `gradwatch` command: a thin shell over the library.

Each subcommand lives in its own `*_cmd.py` module exposing `register(subparsers)`, which adds a
parser whose `func(args) -> int` calls one library function. Library errors (`GradwatchError`)
become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from gradwatch import __version__
from gradwatch.errors import GradwatchError, did_you_mean

COMMANDS = {  # what `gradwatch --help` lists, in this order
    "run": "run a script, module or command with every torch process watched",
    "show": "per-layer table (first/last/min/max of each metric) of a run",
    "diagnose": "findings of a run: what is wrong, where, why, what to do",
    "probe": "per-layer gradient flow at initialisation, from one random batch",
    "fix": "try remedies in short trials of your script and say which works",
    "lab": "reproduce the classic experiments (depth, init, clipping, RNNs, ...) with plots",
    "report": "write one self-contained HTML report of a run (findings, gradient flow, heat maps, loss)",
    "export": "export a run to TensorBoard (scalars per layer and metric, findings as text)",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of the command `only`, from its module (`register`); without one, the command
    list alone. A command's module may import torch or matplotlib (2-3 s), which neither
    `gradwatch --help` nor `gradwatch run`, whose work is in the child process, should wait for."""
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Make vanishing and exploding gradients visible, explained, predicted and fixed.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, summary in COMMANDS.items():
        if name == only:
            importlib.import_module(f"gradwatch.cli.{name}_cmd").register(sub)
        else:  # a name and a summary, for the list and for "did you mean"
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


NEGATIVE = re.compile(r"-[\d.,]+")


def negative_values(sub: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--input-shape -1,64` as `--input-shape=-1,64`: argparse takes a value that starts with '-' for an
    option (only a plain `-1` passes) and says "expected one argument"; joined, the command's own check
    names what is wrong with the value. The script's arguments after `run`/`fix` are left as they are."""
    takes_value = {o for o, a in sub._option_string_actions.items() if a.nargs is None}
    remainder = any(a.nargs == argparse.REMAINDER for a in sub._actions if not a.option_strings)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--" or (remainder and not a.startswith("-")):
            return out + argv[i:]
        if a in takes_value and i + 1 < len(argv):
            value = argv[i + 1]
            out += [f"{a}={value}"] if NEGATIVE.fullmatch(value) else [a, value]
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse, with two repairs: a misspelt command names the one meant, and an unknown option is
    reported by its command's parser (its usage, the option it resembles), not by the top level's
    `usage: gradwatch [-h] COMMAND ...`, which does not show the command's options."""
    commands = _commands(parser)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        first = argv[0]
        hint = (" (for help: gradwatch --help, or gradwatch COMMAND --help)" if first in ("help", "h", "?")
                else did_you_mean(first, commands))
        parser.error(f"unknown command {first!r}{hint}; choose from {', '.join(commands)}")
    if argv and argv[0] in commands:
        argv = argv[:1] + negative_values(commands[argv[0]], argv[1:])
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = commands[args.command]
        options = [o for o in sub._option_string_actions if o.startswith("--")]
        hints = "".join(did_you_mean(e.split("=")[0], options) for e in extra if e.startswith("-"))
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hints}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parse(parser, argv)
    try:
        return int(args.func(args) or 0)
    except GradwatchError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
