"""Overhead of watching DDP training (2 CPU processes, gloo), and the collectives watching adds.

Both ranks train the same workload; watched and unwatched blocks of steps take turns (in the same
shuffled order on every rank, as DDP needs), the ratio to the unwatched block of the same round
is kept and the table gives rank 0's median over rounds. Collectives are counted with the gloo
group's sequence number, which every collective advances (DDP's own bucket all-reduces too).

    OMP_NUM_THREADS=1 python benchmarks/ddp_overhead.py [--rounds 20] [--block 10] [--only deep_mlp]
                                                        [--sample-every 10]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwatch  # noqa: E402
from models import WORKLOADS  # noqa: E402

WORLD = 2


def collectives() -> int:
    return dist.distributed_c10d._get_default_group()._get_sequence_number_for_group()


def run_workload(name: str, rounds: int, block: int, sample_every: int, out_dir: str) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, (x, y), loss_fn = WORKLOADS[name]()
    share = len(x) // WORLD  # each rank its half of the batch
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-4)
    watch = gradwatch.watch(ddp, opt, out=Path(out_dir) / name, warn=False, sample_every=sample_every)
    watch.pause()
    counts = {"none": [0, 0], "gradwatch": [0, 0]}  # collectives, steps

    def timed_block(variant: str) -> float:
        if variant == "gradwatch":
            watch.resume()
        seq = collectives()
        start = time.perf_counter()
        for _ in range(block):
            loss = loss_fn(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        elapsed = time.perf_counter() - start
        if variant == "gradwatch":
            watch.pause()
        counts[variant][0] += collectives() - seq
        counts[variant][1] += block
        return elapsed / block

    variants = ["none", "gradwatch"]
    for v in variants:  # warm-up: allocator, DDP bucket rebuild, first flush
        timed_block(v)
    counts = {v: [0, 0] for v in variants}
    ratios, base = [], []
    rng = random.Random(0)  # the same order on every rank
    for _ in range(rounds):
        order = variants[:]
        rng.shuffle(order)
        times = {v: timed_block(v) for v in order}
        base.append(times["none"])
        ratios.append(times["gradwatch"] / times["none"])
    watch.detach()
    per_step = {v: c / s for v, (c, s) in counts.items()}
    return {"workload": name, "step_ms": 1e3 * statistics.median(base), "ratio": statistics.median(ratios),
            "plain_per_step": per_step["none"], "added_per_step": per_step["gradwatch"] - per_step["none"],
            "by_gradwatch": watch._dist.collectives, "watched_steps": counts["gradwatch"][1]}


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    names = [args.only] if args.only else ["deep_mlp", "small_cnn", "transformer"]
    if rank == 0:
        print(f"torch {torch.__version__}, {WORLD} processes x {torch.get_num_threads()} thread, gloo, "
              f"{args.rounds} rounds x {args.block} steps per variant, flush_every=50, sample_every={args.sample_every}")
        print("| workload | unwatched DDP step (ms) | watched / unwatched (median) | DDP collectives per step | "
              "added per step by watching | gradwatch collectives (watched steps) |")
        print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out_dir:
        for name in names:
            r = run_workload(name, args.rounds, args.block, args.sample_every, out_dir)
            if rank == 0:
                print(f"| {name} | {r['step_ms']:.1f} | {r['ratio']:.3f}x | {r['plain_per_step']:.2f} | "
                      f"{r['added_per_step']:.3f} | {r['by_gradwatch']} ({r['watched_steps']}) |", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--only", choices=sorted(WORKLOADS))
    parser.add_argument("--sample-every", type=int, default=10, help="the watch's (default 10)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args), nprocs=WORLD)


if __name__ == "__main__":
    main()
