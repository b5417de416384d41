"""Two watched DDP models, one after the other in one process (gloo, world size 1), from
tests/test_distributed_ranks.py:

    python ddp_two_watches.py OUT

The first trains under ddp.join(), the second (watched as the DDP, then as the module it wraps)
without: each watch follows its own DDP's join() only. Prints one line per run:
`<name> <collectives> <uneven>`."""

import contextlib
import sys

import torch
import torch.distributed as dist
from torch import nn


def train(out: str, join: bool, inner: bool, keep: list) -> tuple[int, bool]:
    import gradwatch

    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)))
    keep.append(ddp)  # the models stay alive, as in a script that evaluates them afterwards
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    watch = gradwatch.watch(ddp.module if inner else ddp, opt, out=out, flush_every=5, warn=False)
    with ddp.join() if join else contextlib.nullcontext():
        for _ in range(10):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(torch.randn(4, 6)), torch.randn(4, 1)).backward()
            opt.step()
    d = watch._dist
    watch.detach()
    return d.collectives, d.uneven()


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=0, world_size=1)
    try:
        keep: list = []
        for name, join, inner in (("joined", True, False), ("plain", False, False), ("inner", False, True)):
            print(name, *train(f"{out}/{name}", join, inner, keep), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
