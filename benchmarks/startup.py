"""Start-up cost of the `gradwatch` command: wall time of a tiny watched run against the same script
unwatched, and of `--help`, measured side by side in interleaved rounds (medians).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/startup.py --rounds 5 [--ref OTHER_SRC]

`--ref` also times the same commands with another source tree on PYTHONPATH (a clone of an earlier
commit's `src`), so a change is measured against what it replaced in one run.
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

SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN = """import torch
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(5):
    opt.zero_grad(); model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
"""


def commands(script: Path, out: Path) -> dict[str, list[str]]:
    gw = [sys.executable, "-m", "gradwatch"]
    return {
        "python train.py (unwatched)": [sys.executable, str(script)],
        "gradwatch run -- python train.py": gw + ["run", "--out", str(out), "--", sys.executable, str(script)],
        "gradwatch --help": gw + ["--help"],
        "gradwatch run --help": gw + ["run", "--help"],
    }


def timed(cmd: list[str], src: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ref", type=Path, help="another source tree to time beside this one")
    args = parser.parse_args()
    trees = {"this": SRC} | ({"ref": args.ref.resolve()} if args.ref else {})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "train.py"
        script.write_text(TRAIN)
        cmds = commands(script, Path(tmp) / "run")
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for label, cmd in cmds.items():
                for tree, src in trees.items():
                    times.setdefault((label, tree), []).append(timed(cmd, src))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(times[("python train.py (unwatched)", "this")])
    head = "| command | " + " | ".join(f"{t} (s)" for t in trees) + (" | this / ref |" if args.ref else " |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for label in cmds:
        meds = [statistics.median(times[(label, t)]) for t in trees]
        row = f"| {label} | " + " | ".join(f"{m:.2f}" for m in meds)
        print(row + (f" | {meds[0] / meds[1]:.2f}x |" if args.ref else " |"))
    print(f"\nunwatched script: {base:.2f} s (median of {args.rounds})")


if __name__ == "__main__":
    main()
