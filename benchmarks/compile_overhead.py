"""Overhead of zero-code watching (`gradwatch run`) on a `torch.compile`d model.

Watching can't be switched on and off inside one compiled process (torch's guard settings are
global), so each round runs the same script twice, plain and under `gradwatch run`, in shuffled
order. Each run reports its median step time after warm-up, and the table gives the median ratio
over rounds. The model is small (a 5 ms step), so the per-call costs watching adds stand out.

    OMP_NUM_THREADS=1 python benchmarks/compile_overhead.py [--rounds 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = '''
import statistics, sys, time, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.GELU())], nn.Linear(256, 10))
compiled = torch.compile(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
times = []
for i in range(30 + int(sys.argv[1])):
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(compiled(x), y).backward()
    opt.step()
    if i >= 30:
        times.append(time.perf_counter() - start)
print("median_ms", statistics.median(times) * 1e3)
'''


def run(script: Path, steps: int, watched: bool, out: Path) -> float:
    cmd = [sys.executable, str(script), str(steps)]
    if watched:
        cmd = [sys.executable, "-m", "gradwatch", "run", "--out", str(out), *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.split("median_ms")[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "compiled_mlp.py"
        script.write_text(SCRIPT)
        ratios, plain_ms = [], []
        for r in range(args.rounds):
            order = [False, True]
            random.shuffle(order)
            ms = {w: run(script, args.steps, w, Path(tmp) / f"run-{r}") for w in order}
            ratios.append(ms[True] / ms[False])
            plain_ms.append(ms[False])
            print(f"round {r}: plain {ms[False]:.2f} ms, watched {ms[True]:.2f} ms", file=sys.stderr)
    print("| workload | compiled step, plain (ms) | under gradwatch run |")
    print("|---|---|---|")
    print(f"| 6×256 Linear+GELU MLP, batch 128, inductor | {statistics.median(plain_ms):.2f} | "
          f"{statistics.median(ratios):.2f}x |")


if __name__ == "__main__":
    main()
