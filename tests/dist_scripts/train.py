"""A small training run for the distributed tests, launched by torchrun (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 train.py SCENARIO OUT

Every rank trains on its half of the same global batch, so DDP's averaged gradient equals the
gradient of one process training on the whole batch (`reference` in tests/test_distributed.py).
Scenarios:
  ddp       out/watched: watched DDP run; out/nan: the same with a NaN input on rank 1 at NAN_STEP;
            out/stop: that again with stop_on=("non_finite",) and all_ranks=True, out/stopped-rank{R}.txt:
            how each stopped;
            out/identity-rank{R}.pt: losses and weights watched and unwatched; out/collectives-rank{R}.json
  fsdp      out/fsdp: FSDP FULL_SHARD (use_orig_params=True); out/fsdp2: fully_shard (FSDP2);
            out/clip.pt: per clipper, the norms it returned and the full weights after CLIP_STEPS
  kill      watched DDP run; rank 1 SIGKILLs itself at KILL_STEP
  plain     DDP with no gradwatch call (for `gradwatch run -- torchrun ...`)
  raise     plain, but rank 1 raises at KILL_STEP
"""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS, GLOBAL_BATCH, NAN_STEP, KILL_STEP, FLUSH_EVERY, CLIP_STEPS = 12, 8, 7, 25, 5, 6
CLIPPERS = ("norm", "value", "agc", "autoclip", "zclip")


def make_clipper(name: str, fsdp=None):
    """Thresholds low enough that every clipper clips; `fsdp`: the FSDP1 model (its group, layout)."""
    from gradwatch.remedies import clip

    group = None if fsdp is None else fsdp.process_group
    return {"norm": lambda: clip.ClipNorm(0.3, process_group=group),
            "value": lambda: clip.ClipValue(0.02, process_group=group),
            "agc": lambda: clip.AGC(clipping=0.05, fsdp=fsdp),
            "autoclip": lambda: clip.AutoClip(percentile=50, process_group=group),
            "zclip": lambda: clip.ZClip(warmup_steps=2, z_thresh=0.5, process_group=group)}[name]()


def train_clipped(model, clipper, rank=None, world=2) -> list[float]:
    """CLIP_STEPS of SGD with `clipper` attached; the norms it returned."""
    from gradwatch.remedies import clip

    norms = []

    def recording(params):
        norm = clipper(params)
        if norm is not None:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            norms.append(float(norm))
        return norm

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with clip.attach(opt, recording):
        train(model, opt, CLIP_STEPS, rank, world)
    return norms


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(step: int, rank: int | None = None, world: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`, or rank `rank`'s equal share of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
    if rank is None:
        return x, y
    share = GLOBAL_BATCH // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def train(model, opt, steps, rank=None, world=2, nan_step=None, kill_step=None, raise_step=None):
    losses = []
    for step in range(steps):
        x, y = batch(step, rank, world)
        if step == nan_step and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        if step == kill_step and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == raise_step and rank == 1:
            raise RuntimeError("rank 1 fails")
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


def sequence_number() -> int:
    """Collectives issued so far on the default group (DDP's own all-reduces included)."""
    return dist.distributed_c10d._get_default_group()._get_sequence_number_for_group()


def ddp_run(out, rank, world, watched, stop_on=(), all_ranks=False, **kw):
    import gradwatch

    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    watch = gradwatch.watch(ddp, opt, out=out, flush_every=FLUSH_EVERY, sample_every=3, warn=False,
                            stop_on=stop_on, all_ranks=all_ranks) if watched else None
    before = sequence_number()
    losses = train(ddp, opt, kw.pop("steps", STEPS), rank, world, **kw)
    if watch is not None:
        watch.detach()
    return losses, ddp.module, sequence_number() - before, watch


def main():
    from gradwatch.errors import TrainingStopped

    scenario, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if scenario == "ddp":
        losses, model, seq_watched, watch = ddp_run(f"{out}/watched", rank, world, True)
        ref_losses, ref_model, seq_plain, _ = ddp_run(None, rank, world, False)
        torch.save({"losses": [losses, ref_losses],
                    "weights": [model.state_dict(), ref_model.state_dict()]}, f"{out}/identity-rank{rank}.pt")
        with open(f"{out}/collectives-rank{rank}.json", "w") as f:
            json.dump({"watched": seq_watched, "plain": seq_plain, "by_gradwatch": watch._dist.collectives}, f)
        ddp_run(f"{out}/nan", rank, world, True, nan_step=NAN_STEP)
        try:
            ddp_run(f"{out}/stop", rank, world, True, stop_on=("non_finite",), all_ranks=True, nan_step=NAN_STEP)
        except TrainingStopped as exc:
            with open(f"{out}/stopped-rank{rank}.txt", "w") as f:
                f.write(str(exc))
    elif scenario == "fsdp":
        fsdp_runs(out, rank, world)
    elif scenario == "kill":
        ddp_run(out, rank, world, True, steps=10 * KILL_STEP, kill_step=KILL_STEP)
    elif scenario in ("plain", "raise"):
        ddp = nn.parallel.DistributedDataParallel(make_model())
        steps, fail = (STEPS, None) if scenario == "plain" else (10 * KILL_STEP, KILL_STEP)
        train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), steps, rank, world, raise_step=fail)
    leave()  # zero-code: gradwatch exchanges and writes the last steps as the group is destroyed


def leave() -> None:
    """Destroy the process group and exit without the interpreter's finalisation: Gloo's worker
    threads sometimes abort it ("terminate called without an active exception", also with no
    gradwatch at all, 1 run in 5 of a Trainer's). Everything a test reads is written by then."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fsdp_runs(out, rank, world):
    import gradwatch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    model = FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradwatch.watch(model, opt, out=f"{out}/fsdp", flush_every=FLUSH_EVERY, sample_every=3, warn=False):
        train(model, opt, STEPS, rank, world)

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model[::2]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradwatch.watch(model, opt, out=f"{out}/fsdp2", flush_every=FLUSH_EVERY, sample_every=3, warn=False):
        train(model, opt, STEPS, rank, world)

    clipped = {}
    for name in CLIPPERS:
        model = FullyShardedDataParallel(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
        norms = train_clipped(model, make_clipper(name, fsdp=model), rank, world)
        with FullyShardedDataParallel.summon_full_params(model):
            clipped["fsdp", name] = norms, [p.detach().clone() for p in model.parameters()]
        model = make_model()
        for layer in [*model[::2], model]:
            fully_shard(layer, mesh=mesh)
        norms = train_clipped(model, make_clipper(name), rank, world)
        clipped["fsdp2", name] = norms, [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save(clipped, f"{out}/clip.pt")


if __name__ == "__main__":
    main()
