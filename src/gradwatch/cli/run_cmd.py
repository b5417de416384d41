"""gradwatch run: watch a training script with zero code changes."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from gradwatch import runner
from gradwatch.cli.summary import print_run_summary
from gradwatch.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        description=(
            "Run a training script as `python` would, watched: gradwatch run train.py --lr 0.1, "
            "gradwatch run -m pkg.train, or gradwatch run -- torchrun --nproc_per_node 2 train.py. "
            "The store goes to --out (default runs/<timestamp>, linked as runs/latest); findings "
            "are written to RUN/findings.json and summarised on stderr."
        ),
    )
    p.add_argument("--out", help="run directory (default: runs/<timestamp>); refused while another run writes there")
    p.add_argument("--every", type=int, default=1, help="record every N-th step (default 1)")
    p.add_argument("--sample-every", type=int, default=10, help="costlier statistics every N-th step (default 10)")
    p.add_argument("--flush-every", type=int, default=50, help="write to the store every N steps (default 50)")
    p.add_argument("--status", action="store_true",
                   help="draw a live status line on stderr (off by default: the terminal is the script's)")
    # like python -m, everything after the module is the module's own (its --options too)
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE [args]",
                   help="run a library module as a script, like python -m")
    p.add_argument("target", nargs=argparse.REMAINDER,
                   help="script.py [args] | -- COMMAND [args] (a shell script, torchrun, python -X ...)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    for name in ("every", "sample_every", "flush_every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a whole number >= 1")
    command = runner.command_from_target(args.target, args.module)
    run_dir, lock = runner.claim_run_dir(runner.default_run_dir() if args.out is None else args.out)
    try:
        options = {"every": args.every, "sample_every": args.sample_every, "flush_every": args.flush_every}
        if args.status:
            options["status"] = 1
        if args.out is None:
            runner.link_latest(run_dir)
        result = runner.run(command, run_dir, options, lock)
        # stderr closed (`2>&-`): print() would write to stdout, into the script's own output
        err = sys.stderr if sys.stderr is not None else open(os.devnull, "w")
        if result.exit_code == 128 + signal.SIGKILL:  # no chance to store its last steps
            print(f"gradwatch: the command was killed (SIGKILL; out of memory?): the steps after its last store "
                  f"write (every {args.flush_every} steps, --flush-every) are lost", file=err)
        print_run_summary(run_dir, err, result.exit_code)
    finally:
        os.close(lock)
    return result.exit_code
