"""Step-time overhead of watching, against the ways people do this today, measured side by side.

One process, one model per workload; the variants take turns in blocks of steps (A/B/C/..., in a
fresh random order each round) and the ratio to the unwatched block of the same round is kept;
the table gives the median over rounds. Noise on a shared machine cancels in the ratios.
`--clock cpu` times blocks by this process's CPU time instead of the wall clock: on a machine
shared with other work (more runnable threads than cores) the wall clock also counts the time
the process waited for a core (run with OMP_NUM_THREADS=1: the process's CPU time is then its step's).

    python benchmarks/overhead.py [--rounds 20] [--block 10] [--only deep_mlp] [--clock cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwatch  # noqa: E402
import models  # noqa: E402


def many_tiny():
    """Many small parameter tensors (2000 of 8x8 and 8): the per-tensor cost of watching, which the
    other workloads' few big tensors hide."""
    layers = []
    for _ in range(1000):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    x, y = torch.randn(32, 8), torch.randint(0, 8, (32,))
    return nn.Sequential(*layers[:-1]), (x, y), nn.CrossEntropyLoss()


def tiny_mlp():
    """A 3-layer MLP of 16 units, batch 32: a step of well under a millisecond, where the watch's
    fixed cost per step shows (a tester saw it roughly double such a step)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, (torch.randn(32, 16), torch.randn(32, 1)), nn.MSELoss()


WORKLOADS = {**models.WORKLOADS, "many_tiny": many_tiny, "tiny_mlp": tiny_mlp}
OPTIMIZERS = {"many_tiny": lambda params: torch.optim.SGD(params, lr=1e-2)}  # the others: Adam


def _item_loop(model):
    """The forum snippet: one host sync per parameter per step."""
    return [p.grad.norm().item() for p in model.parameters() if p.grad is not None]


def _histograms(model):
    """TensorBoard-style: a histogram of every gradient, copied to the host every step."""
    return [torch.histc(p.grad, bins=64).cpu() for p in model.parameters() if p.grad is not None]


def _floor(model):
    """Reading every gradient byte once: one fused norm, nothing else."""
    return torch._foreach_norm([p.grad for p in model.parameters() if p.grad is not None])


PROBES = {"item_loop": _item_loop, "histograms": _histograms, "floor": _floor}
COCKPIT_WORKLOADS = ("deep_mlp",)  # BackPACK has no extension for BatchNorm, LSTM or attention


def cockpit_block(model, x, y, opt_factory):
    """Cockpit's "economy" configuration on its own copy of the model (BackPACK extends modules).
    Install: pip install --no-deps cockpit-for-pytorch backpack-for-pytorch json_tricks unfoldNd
    pandas 'setuptools<70' (with torch==2.13.0 pinned). Returns None when it is not installed."""
    try:
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils.configuration import configuration
    except ImportError:
        return None
    import copy

    model = extend(copy.deepcopy(model))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    per_sample = torch.nn.CrossEntropyLoss(reduction="none")
    opt = opt_factory(model.parameters())
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
    state = {"step": 0}

    def step():
        out = model(x)
        loss = loss_fn(out, y)
        losses = per_sample(out, y)
        opt.zero_grad()
        info = {"batch_size": len(x), "individual_losses": losses, "loss": loss, "optimizer": opt}
        with cockpit(state["step"], info=info):
            loss.backward(create_graph=cockpit.create_graph(state["step"]))
        opt.step()
        state["step"] += 1

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_workload(name: str, rounds: int, block: int, out_dir: str, clock=time.perf_counter) -> dict:
    torch.manual_seed(0)
    model, (x, y), loss_fn = WORKLOADS[name]()
    make_opt = OPTIMIZERS.get(name, lambda params: torch.optim.Adam(params, lr=1e-4))
    opt = make_opt(model.parameters())
    watch = gradwatch.watch(model, opt, out=Path(out_dir) / name)
    watch.pause()
    # the same watch without live diagnosis at flushes, to show what the live rules cost
    quiet = gradwatch.watch(model, opt, out=Path(out_dir) / f"{name}-quiet", warn=False)
    quiet.pause()
    watches = {"gradwatch": watch, "no_live_rules": quiet}

    def step(probe=None):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if probe is not None:
            probe(model)
        opt.step()

    cockpit_step = None
    if name in COCKPIT_WORKLOADS:
        cockpit_step = cockpit_block(model, x, y, make_opt)

    def timed_block(variant: str) -> float:
        probe = PROBES.get(variant)
        if variant in watches:
            watches[variant].resume()
        start = clock()
        for _ in range(block):
            if variant == "cockpit":
                cockpit_step()
            else:
                step(probe)
        elapsed = clock() - start
        if variant in watches:
            watches[variant].pause()
        return elapsed / block

    variants = ["none", *watches, *PROBES] + (["cockpit"] if cockpit_step else [])
    for v in variants:  # warm-up: allocator, autograd graph caches, first flush
        timed_block(v)
    ratios = {v: [] for v in variants if v != "none"}
    base_times = []
    rng = random.Random(0)
    for _ in range(rounds):
        order = variants[:]
        rng.shuffle(order)
        times = {v: timed_block(v) for v in order}
        base_times.append(times["none"])
        for v in ratios:
            ratios[v].append(times[v] / times["none"])
    watch.detach()
    quiet.detach()
    result = {"workload": name, "step_ms": 1e3 * statistics.median(base_times),
              "steps_watched": len(watch.series().steps)}
    result.update({v: statistics.median(r) for v, r in ratios.items()})
    floor_cost = result["floor"] - 1
    result["gw_over_floor"] = (result["gradwatch"] - 1) / floor_cost if floor_cost > 1e-4 else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what times a block (default: wall)")
    args = parser.parse_args()
    names = [args.only] if args.only else list(WORKLOADS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.block} steps per variant, "
          f"{args.clock} clock")
    print("| workload | unwatched step (ms) | gradwatch | gradwatch without live rules | p.grad.norm().item() loop | "
          "histc + host copy | Cockpit economy | floor (one foreach_norm) | gradwatch cost / floor cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out_dir:
        for name in names:
            r = run_workload(name, args.rounds, args.block, out_dir, CLOCKS[args.clock])
            cockpit = f"{r['cockpit']:.2f}x" if "cockpit" in r else "n/a"
            print(f"| {name} | {r['step_ms']:.1f} | {r['gradwatch']:.3f}x | {r['no_live_rules']:.3f}x | {r['item_loop']:.3f}x | "
                  f"{r['histograms']:.3f}x | {cockpit} | {r['floor']:.3f}x | {r['gw_over_floor']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
