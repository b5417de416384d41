"""Watched DDP with uneven inputs under `ddp.join()`, launched by torchrun (gloo, 2 CPU processes)
from tests/test_distributed_ranks.py.

    torchrun --standalone --nproc_per_node 2 ddp_join.py OUT

Rank 0 has STEPS[0] batches, rank 1 STEPS[1]: once rank 1 is out of them it waits in the join,
which shadows DDP's all-reduces only. Rank 0 writes OUT/grads.pt: per step, each Linear layer's
gradient norm as the optimizer applies it (read from .grad after backward); the store is OUT/run.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from train import leave

STEPS, FLUSH_EVERY = (12, 7), 5


def main() -> None:
    import gradwatch

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    watch = gradwatch.watch(ddp, opt, out=f"{out}/run", flush_every=FLUSH_EVERY, warn=False)
    applied = []
    g = torch.Generator().manual_seed(rank)
    with ddp.join():
        for _ in range(STEPS[rank]):
            x, y = torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            applied.append([float(torch.cat([p.grad.flatten() for p in layer.parameters()]).norm())
                            for layer in ddp.module[::2]])
            opt.step()
    watch.detach()
    if rank == 0:
        torch.save(applied, os.path.join(out, "grads.pt"))
    leave()


if __name__ == "__main__":
    main()
