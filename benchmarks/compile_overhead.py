"""Overhead of zero-code watching (`gradwatch run`) on a `torch.compile`d model.

Watching can't be switched on and off inside one compiled process (torch's guard settings are
global), so each round runs the same script plain and under `gradwatch run`, in shuffled order.
Each run reports its median step time after warm-up (the typical step, between samples) and the
median sampled step; the table gives the median ratios to plain over rounds. The model is small
(a 5 ms step), so the per-call costs stand out.

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
times = {True: [], False: []}  # by sampled (every 10th step, gradwatch's default)
for i in range(30 + int(sys.argv[1])):
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(compiled(x), y).backward()
    opt.step()
    if i >= 30:
        times[i % 10 == 0].append(time.perf_counter() - start)
print("sampled_ms", statistics.median(times[True]) * 1e3)
print("median_ms", statistics.median(times[False]) * 1e3)
'''


VARIANTS = ("plain", "gradwatch run")


def run(script: Path, steps: int, variant: str, out: Path) -> tuple[float, float]:
    """(median step, median sampled step) in ms."""
    cmd = [sys.executable, str(script), str(steps), variant]
    if variant == "gradwatch run":
        cmd = [sys.executable, "-m", "gradwatch", "run", "--out", str(out), *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.split("median_ms")[-1]), float(result.stdout.split("sampled_ms")[-1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "compiled_mlp.py"
        script.write_text(SCRIPT)
        plain_ms, ratios, sampled = [], [], []
        for r in range(args.rounds):
            order = list(VARIANTS)
            random.shuffle(order)
            ms = {v: run(script, args.steps, v, Path(tmp) / f"run-{r}") for v in order}
            plain_ms.append(ms["plain"][0])
            ratios.append(ms["gradwatch run"][0] / ms["plain"][0])
            sampled.append(ms["gradwatch run"][1] / ms["plain"][1])
            print(f"round {r}: " + ", ".join(f"{v} {ms[v][0]:.2f} ms" for v in VARIANTS), file=sys.stderr)
    print("| workload | compiled step, plain (ms) | under gradwatch run | its sampled steps |")
    print("|---|---|---|---|")
    print(f"| 6×256 Linear+GELU MLP, batch 128, inductor | {statistics.median(plain_ms):.2f} | "
          f"{statistics.median(ratios):.2f}x | {statistics.median(sampled):.2f}x |")


if __name__ == "__main__":
    main()
