"""Overhead of zero-code watching (`gradwatch run`) on a `torch.compile`d model.

Watching can't be switched on and off inside one compiled process (torch's guard settings are
global), so each round runs the same script plain, under `gradwatch run`, and plain with each of
two things watching adds on its own (torch checking module-hook guards; a no-op post-accumulate-
grad hook per parameter), in shuffled order. Each run reports its median step time after warm-up,
and the table gives the median ratio to plain over rounds. The model is small (a 5 ms step), so
the per-call costs stand out.

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
if sys.argv[2] == "hook_guards":
    import torch._dynamo.config
    torch._dynamo.config.skip_nnmodule_hook_guards = False
if sys.argv[2] == "grad_hooks":
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: None)
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


VARIANTS = ("plain", "gradwatch run", "hook_guards", "grad_hooks")


def run(script: Path, steps: int, variant: str, out: Path) -> float:
    cmd = [sys.executable, str(script), str(steps), variant]
    if variant == "gradwatch run":
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
        ratios: dict[str, list[float]] = {v: [] for v in VARIANTS[1:]}
        plain_ms = []
        for r in range(args.rounds):
            order = list(VARIANTS)
            random.shuffle(order)
            ms = {v: run(script, args.steps, v, Path(tmp) / f"run-{r}") for v in order}
            plain_ms.append(ms["plain"])
            for v in VARIANTS[1:]:
                ratios[v].append(ms[v] / ms["plain"])
            print(f"round {r}: " + ", ".join(f"{v} {ms[v]:.2f} ms" for v in VARIANTS), file=sys.stderr)
    print("| workload | compiled step, plain (ms) | under gradwatch run | plain + hook guards on "
          "| plain + no-op post-accumulate-grad hooks |")
    print("|---|---|---|---|---|")
    print(f"| 6×256 Linear+GELU MLP, batch 128, inductor | {statistics.median(plain_ms):.2f} | "
          + " | ".join(f"{statistics.median(ratios[v]):.2f}x" for v in VARIANTS[1:]) + " |")


if __name__ == "__main__":
    main()
