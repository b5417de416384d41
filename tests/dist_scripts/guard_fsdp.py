"""gw.guard under FSDP, launched by torchrun (gloo, 2 CPU processes) from tests/test_distributed_ranks.py.

    torchrun --standalone --nproc_per_node 2 guard_fsdp.py OUT

At BAD_STEP rank 1 alone finds an Inf in its shard of the embedding's gradient (a row only it
holds, as an overflowing rare token's row would be). For FSDP1 (use_orig_params=True) and FSDP2
in turn, writes OUT/guard-rank{R}.pt: per kind, the guard's (steps, skipped) on this rank and the
full weights after STEPS steps of Adam.
"""

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

STEPS, BAD_STEP = 3, 1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(8, 4), nn.Flatten(), nn.Linear(8, 1))


def tokens(rank: int) -> torch.Tensor:
    """Rank `rank`'s share of the batch (rows 0-1 of the global batch on rank 0, 2-3 on rank 1)."""
    return torch.tensor([[1, 2], [3, 4], [5, 6], [7, 7]])[2 * rank:2 * rank + 2]


def sharded(kind: str, world: int) -> nn.Module:
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, mesh = make_model(), init_device_mesh("cpu", (world,))
    for m in [model[0], model[2], model]:
        fully_shard(m, mesh=mesh)
    return model


def full_weights(kind: str, model: nn.Module) -> list[torch.Tensor]:
    if kind == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model):
            return [p.detach().clone() for p in model.parameters()]
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def run(kind: str, rank: int, world: int) -> dict:
    import gradwatch as gw

    model = sharded(kind, world)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    guard = gw.guard(opt, patience=5)
    for step in range(STEPS):
        opt.zero_grad()
        model(tokens(rank)).sum().backward()
        grad = next(model.parameters()).grad
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        if step == BAD_STEP and rank == 1 and grad.numel():
            grad.view(-1)[-1] = float("inf")  # the last embedding row: rank 1's shard only
        opt.step()
    return {"steps": guard.steps, "skipped": guard.skipped, "weights": full_weights(kind, model)}


def main() -> None:
    from train import leave  # (torchrun puts this folder on sys.path; the tests import this file alone)

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {kind: run(kind, rank, world) for kind in ("fsdp", "fsdp2")}
    torch.save(result, os.path.join(sys.argv[1], f"guard-rank{rank}.pt"))
    leave()


if __name__ == "__main__":
    main()
