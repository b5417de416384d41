"""Per-step cost of the remedies: a training step on a deep MLP, unclipped vs each clipper vs guard.

Variants run interleaved in a fresh random order every round (so drift in machine speed hits all
alike); the table gives each variant's median step time and the median over rounds of its ratio to
the unclipped run of the same round.
"guard (snapshot)" is the sync-free alternative the guard did not take: copy every parameter and
optimizer state tensor, step, then torch.where them back if a gradient was non-finite.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/clip_overhead.py [--rounds 40] [--steps 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from gradwatch.remedies import clip
from gradwatch.remedies.guard import guard, norms_finite


def make(depth: int, width: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def snapshot_guard(opt: torch.optim.Optimizer) -> None:
    """Sync-free prototype: snapshot, step, restore with torch.where where the flag says non-finite."""
    original = opt.step

    def step() -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        ok = norms_finite([p.grad for p in params if p.grad is not None])
        state = [t for p in params for t in opt.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        tensors = [p.data for p in params] + state
        saved = [t.clone() for t in tensors]
        original()
        for t, s in zip(tensors, saved):
            t.copy_(torch.where(ok, t, s))

    opt.step = step  # type: ignore[method-assign]


VARIANTS = {
    "unclipped": lambda opt: None,
    "clip_norm": lambda opt: clip.attach(opt, clip.ClipNorm(1.0)),
    "AGC": lambda opt: clip.attach(opt, clip.AGC()),
    "AutoClip": lambda opt: clip.attach(opt, clip.AutoClip()),
    "ZClip": lambda opt: clip.attach(opt, clip.ZClip()),
    "guard (1 sync)": lambda opt: guard(opt),
    "guard (snapshot)": snapshot_guard,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # tiny activations deep in a ReLU stack would otherwise dominate
    runs = {}
    for name, attach in VARIANTS.items():
        model, opt = make(args.depth, args.width)
        attach(opt)
        runs[name] = (model, opt)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, args.width, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {name: [] for name in runs}
    ratios: dict[str, list[float]] = {name: [] for name in runs}  # per round, against that round's unclipped
    order = list(runs)
    rng = random.Random(0)
    for r in range(args.rounds + 1):
        rng.shuffle(order)
        for name in order:
            model, opt = runs[name]
            this = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
                this.append(time.perf_counter() - t0)
            if r:  # round 0 warms up
                times[name].append(statistics.median(this))
        if r:
            for name in runs:
                ratios[name].append(times[name][-1] / times["unclipped"][-1])
    print(f"{args.depth}x{args.width} MLP + Adam, batch {args.batch}, {torch.get_num_threads()} thread, "
          f"{args.rounds} rounds x {args.steps} steps, torch {torch.__version__}\n")
    print("| variant | median step (ms) | median ratio to unclipped (same round) |")
    print("|---|---:|---:|")
    for name in runs:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.2f} | {statistics.median(ratios[name]):.3f} |")


if __name__ == "__main__":
    main()
