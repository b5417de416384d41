"""Cost of fix's scan for files other programs write (`fix.touched.written_by_others`): once per
trial, it reads every process's open descriptors from /proc. Timed as the machine is, then with
`--extra` idle processes started, each holding `--files` files open.

    .venv/bin/python benchmarks/workspace_scan.py --rounds 20 --extra 100 --files 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradwatch.fix.touched import written_by_others

HOLDER = ("import sys, time; files = [open('/dev/null') for _ in range(int(sys.argv[1]))]; "
          "print('ready', flush=True); sys.stdin.read()")


def timed(root: Path, rounds: int) -> float:
    """Median milliseconds of one scan."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        written_by_others(root)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def processes() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--extra", type=int, default=100, help="idle processes to add (default: 100)")
    parser.add_argument("--files", type=int, default=20, help="files each holds open (default: 20)")
    args = parser.parse_args()
    if not Path("/proc/self/fd").is_dir():
        sys.exit("no /proc here: the scan finds nothing and costs nothing")
    with tempfile.TemporaryDirectory() as root:
        print(f"{processes()} processes: {timed(Path(root), args.rounds):.1f} ms a scan (median of {args.rounds})")
        held = [subprocess.Popen([sys.executable, "-c", HOLDER, str(args.files)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(args.extra)]
        try:
            for proc in held:
                proc.stdout.readline()
            print(f"{processes()} processes: {timed(Path(root), args.rounds):.1f} ms a scan (median of {args.rounds})")
        finally:
            for proc in held:
                proc.stdin.close()
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
