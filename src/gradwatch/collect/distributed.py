"""Watching a model trained by several processes: DDP, FSDP (use_orig_params=True) and FSDP2.

Exact statistics (docs/distributed.md):
- gradients are read after `backward` returns, when DDP's all-reduce and FSDP's reduce-scatter
  are complete (per-parameter post-accumulate-grad hooks would see the local gradient instead);
- a sharded parameter's norms are taken over the local shard, and the squares of the shards are
  summed across ranks once per flush, in the one collective a flush makes: an `all_gather` of a
  small float64 table (one row per step) that also carries each rank's local loss, so the stored
  loss is the mean over ranks and a rank whose own loss went non-finite is named in an event;
- rank 0 writes the store (every rank with `all_ranks=True`), the others only take part in the
  exchange. Nothing here runs between flushes except under `stop_on=("non_finite",)`, where the
  ranks agree on stopping with one tiny all-reduce per step;
- under DDP's join() (uneven inputs) no collective at all (`Distributed.uneven`).
"""

from __future__ import annotations

import atexit
import functools
import gc
import itertools
import math
import os
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gradwatch.collect import patches
from gradwatch.collect.stats import MISSING, entries, foreach_norm32
from gradwatch.errors import ConfigError, first_line

EVENT = "rank_non_finite"  # events row: (step, "rank_non_finite", "rank R: loss nan|inf|-inf")
EXCHANGE_FAILED = "distributed_error"  # events row: the exchange failed (a rank died); local values kept
_FSDP_WRAPPED = "_fsdp_wrapped_module"
_FIELDS = ("grad", "grad_max", "weight", "delta")  # StepRecord per-parameter fields, in table order
_found_ddp: weakref.ref | None = None  # the DDP wrapper `unwrap` last found, for the Distributed made next


def process_rank() -> int | None:
    """This process's global rank: torch.distributed's once initialised, else torchrun's RANK."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank holds (a DTensor's local shard; any other tensor as is)."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:  # most tensors: two hasattr cost ~3 µs,
        # 13 ms a sampled step for 2000 weights (read before and after each update)
        return t
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def clean_name(name: str, fallback: str) -> str:
    """Layer names as in the unwrapped model: FSDP's wrapper modules are not part of the name."""
    return ".".join(part for part in name.split(".") if part != _FSDP_WRAPPED) or fallback


def _shard_group(param: torch.Tensor):
    """FSDP2: the process group over which a DTensor parameter is sharded (None: replicated)."""
    from torch.distributed.tensor import Shard

    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            return param.device_mesh.get_group(dim)
    return None


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None, object, set[int]]:
    """(module whose layers to watch, "ddp" | "fsdp" | "fsdp2" | None, process group, ids of the
    parameters each rank holds only a shard of)."""
    global _found_ddp
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    _found_ddp = None
    if isinstance(model, DistributedDataParallel):
        _found_ddp = weakref.ref(model)
        return model.module, "ddp", model.process_group, set()
    if isinstance(model, FullyShardedDataParallel):
        if not model._use_orig_params:
            raise ConfigError(
                "FullyShardedDataParallel(use_orig_params=False) hides the layers' parameters in one flat "
                "parameter; wrap the model with use_orig_params=True to watch it per layer"
            )
        from torch.distributed.fsdp import ShardingStrategy

        sharded = set() if model.sharding_strategy == ShardingStrategy.NO_SHARD else {id(p) for p in model.parameters()}
        return model, "fsdp", model.process_group, sharded
    groups = {id(p): _shard_group(p) for p in model.parameters() if hasattr(p, "placements")}
    if groups:
        group = next((g for g in groups.values() if g is not None), None)
        return model, "fsdp2", group, {i for i, g in groups.items() if g is not None}
    wrapper = ddp_wrapper(model)
    if wrapper is not None:  # the module a DDP wraps, watched itself: read as the DDP's
        _found_ddp = weakref.ref(wrapper)
        return model, "ddp", wrapper.process_group, set()
    return model, None, None, set()


def ddp_wrapper(model: nn.Module) -> nn.Module | None:
    """The DistributedDataParallel that wraps `model` (or a model holding it), if one exists.
    `watch(net, opt)` with `DistributedDataParallel(net)` training it: hooks on net's parameters
    fire before DDP's all-reduce writes the averaged gradient, so each rank would record its own
    local gradient (measured 4-7% off the applied one), and every rank would write the same
    store. Found among live objects, once per watched model (only under torch.distributed)."""
    from torch.nn.parallel import DistributedDataParallel

    for o in gc.get_objects():  # (type's __mro__: isinstance would touch deprecated objects' __class__)
        if DistributedDataParallel in type(o).__mro__ and any(m is model for m in o.module.modules()):
            return o
    return None


class Distributed:
    """What a Watch does differently for a model whose training spans processes."""

    def __init__(self, kind: str, group, all_ranks: bool, ddp: nn.Module | None = None):
        """ddp: the DistributedDataParallel training the model (default: the one `unwrap` found last),
        whose join() is this watch's to follow; another DDP's in the process is not (a global set of
        them let one joined run switch off the exchange of every later one)."""
        global _found_ddp
        ddp = ddp if ddp is not None else _found_ddp() if kind == "ddp" and _found_ddp is not None else None
        _found_ddp = None
        self._ddp = weakref.ref(ddp) if ddp is not None else None
        self.kind = kind
        self.group = group
        self.rank = dist.get_rank()
        self.world = dist.get_world_size(group)
        self.all_ranks = bool(all_ranks)
        self.writes = self.all_ranks or self.rank == 0
        self.sharded_ids: set[int] = set()  # parameters each rank holds only a shard of
        self.sharded: np.ndarray = np.zeros(0, dtype=bool)  # per watched parameter
        self.collectives = 0  # made by gradwatch (the benchmark reports it)
        self._bad: set[int] = set()  # ranks whose own loss was non-finite at the last step
        self._failed = False
        self._uneven = False  # DDP's join() was entered: the ranks no longer step together
        self._abandoned = ""  # why no more collectives may be made (see abandon)
        self._abandon_said = True  # its distributed_error event is written (by the Watch)
        self._restore = None
        self._rebound: list = []  # modules whose own destroy_process_group name is wrapped
        self._at_exit = None

    @property
    def meta(self) -> dict:
        local = os.environ.get("LOCAL_WORLD_SIZE", "")  # torchrun's processes on this node
        return {"kind": self.kind, "rank": self.rank, "world_size": self.world, "all_ranks": self.all_ranks,
                **({"local_world_size": int(local)} if local.isdigit() else {})}

    def set_params(self, params: list[torch.Tensor]) -> None:
        self.sharded = np.array([id(p) in self.sharded_ids for p in params], dtype=bool)

    def store_path(self, path: Path) -> Path:
        """Rank 0 writes `path`; with all_ranks every rank writes `<stem>-rank{R}.sqlite` beside it."""
        if not self.all_ranks:
            return path
        stem = "gradwatch" if path.stem.startswith("gradwatch") else path.stem
        return path.with_name(f"{stem}-rank{self.rank}.sqlite")

    # ------------------------------------------------------------ reading (no host sync, no collective)
    def read(self, params: list[torch.Tensor], sampled: bool):
        """Per-parameter (grad L2, max |g|, weight L2) of this rank's part of the synchronised
        gradients; MISSING where a parameter (or its local shard) has no gradient."""
        device = params[0].device
        grads = [None if p.grad is None else entries(local(p.grad.detach())) for p in params]
        have = [i for i, g in enumerate(grads) if g is not None]
        grad = _scatter(len(params), have, [grads[i] for i in have], device)
        if not sampled:
            return grad, None, None
        gmax = torch.full((len(params),), MISSING, device=device)
        for i in have:
            if grads[i].numel():  # max |g|; 10x faster than the inf-norm on CPU
                low, high = torch.aminmax(grads[i])
                torch.maximum(high.float(), low.float().neg(), out=gmax[i])
        weight = foreach_norm32([local(p.detach()) for p in params])
        return grad, gmax, weight

    def uneven(self) -> bool:
        """DDP's `join()` (uneven inputs) was entered: a rank out of batches waits in the join,
        shadowing DDP's own all-reduces only, so a collective of gradwatch's would hang the run (or
        meet another rank's). From then on nothing is exchanged: DDP's gradients are the same on
        every rank, and the loss stored is this rank's own. (torch never disables a join config
        once set, so every rank sees it from its `with ddp.join():` on, and for good.)"""
        if not self._uneven:
            ddp = self._ddp() if self._ddp is not None else None
            self._uneven = bool(getattr(getattr(ddp, "_join_config", None), "enable", False))
        return self._uneven

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on one (one all-reduce; used by stop_on only)."""
        if self._failed or not dist.is_initialized() or self.uneven():
            return flag
        t = torch.tensor([float(flag)], device=self._device())
        self.collectives += 1
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cpu") if backend == "gloo" else torch.device(torch.accelerator.current_accelerator())

    # ------------------------------------------------------------ the exchange (one collective per flush)
    def exchange(self, records: list) -> list[tuple[int, str, str]]:
        """Make `records` global in place (mean loss over ranks, norms over the full sharded
        parameters) and return the events naming ranks whose own loss went non-finite."""
        if not records or self.uneven():
            return []
        n = len(self.sharded)
        try:
            if self._abandoned:
                raise RuntimeError(self._abandoned)
            if self._failed or not dist.is_initialized():
                raise RuntimeError("torch.distributed is not initialised any more")
            table = _table(records, n).to(self._device())
            gathered = [torch.empty_like(table) for _ in range(self.world)]
            self.collectives += 1
            dist.all_gather(gathered, table, group=self.group)
        except Exception as exc:  # a rank died or the group is gone: keep what is exact locally
            said = self._failed or (self._abandoned and self._abandon_said)  # (said where it happens)
            events = [] if said else [(records[0].step, EXCHANGE_FAILED, f"rank {self.rank}: {exc}"[:300])]
            self._failed = True
            for rec in records:
                for name in _FIELDS:
                    value = getattr(rec, name)
                    if value is not None and self.sharded.any():
                        keep = torch.as_tensor(~self.sharded, device=value.device)
                        setattr(rec, name, torch.where(keep, value, torch.full_like(value, math.nan)))
            return events
        every = np.stack([g.cpu().numpy() for g in gathered])  # (ranks, steps, columns)
        return self._combine(records, every, n)

    def _combine(self, records: list, every: np.ndarray, n: int) -> list[tuple[int, str, str]]:
        has_loss, losses = every[:, :, 0] > 0, every[:, :, 1]
        blocks = {name: every[:, :, 2 + k * n: 2 + (k + 1) * n] for k, name in enumerate(_FIELDS)}
        counts = every[:, :, 2 + len(_FIELDS) * n:]
        sharded = self.sharded
        for row, rec in enumerate(records):
            if has_loss[:, row].all():
                rec.loss_sum, rec.loss_n = torch.tensor(losses[:, row].mean(), dtype=torch.float32), 1
            for name in _FIELDS:
                if getattr(rec, name) is None:
                    continue
                mine = blocks[name][self._index(), row]
                values = blocks[name][:, row]
                if name == "grad_max":
                    merged = np.where((values == MISSING).all(axis=0), MISSING, values.max(axis=0))
                else:
                    present = values != MISSING
                    with np.errstate(over="ignore", invalid="ignore"):
                        merged = np.sqrt((np.where(present, values, 0.0) ** 2).sum(axis=0))
                    merged = np.where(present.any(axis=0), merged, MISSING)
                setattr(rec, name, torch.from_numpy(np.where(sharded, merged, mine)).float())
            if rec.nonfinite is not None or counts[:, row].any():
                total = np.where(sharded, counts[:, row].sum(axis=0), counts[self._index(), row])
                rec.nonfinite = {i: int(c) for i, c in enumerate(total) if c}
        return self._rank_events(records, has_loss, losses)

    def _index(self) -> int:
        return dist.get_group_rank(self.group, self.rank) if self.group is not None else self.rank

    def _rank_events(self, records: list, has_loss: np.ndarray, losses: np.ndarray) -> list:
        """An event when a rank's own loss turns non-finite while another rank's is still finite
        (when all go at once, or follow through the synchronised weights, it is no rank's own)."""
        ranks = [dist.get_global_rank(self.group, r) if self.group is not None else r for r in range(len(losses))]
        events = []
        for row, rec in enumerate(records):
            bad = has_loss[:, row] & ~np.isfinite(losses[:, row])
            if bad.any() and not bad[has_loss[:, row]].all():
                events += [(rec.step, EVENT, f"rank {ranks[r]}: loss {losses[r, row]}")
                           for r in np.flatnonzero(bad) if ranks[r] not in self._bad]
            self._bad = {ranks[r] for r in np.flatnonzero(bad)}
        return events

    # ------------------------------------------------------------ teardown
    @property
    def abandoned(self) -> bool:
        return bool(self._abandoned)

    def abandon(self, why: str, said: bool = True) -> None:
        """This process is ending on an error: the other ranks are inside the training's next
        collective, or dead, so an exchange now would wait for them for the group's timeout (30
        minutes by default). What is left is kept as this rank measured it. `said`: the caller
        writes the distributed_error event (else the next exchange does)."""
        self._abandoned = why
        self._abandon_said = said

    def flush_before_teardown(self, flush) -> None:
        """The last window is exchanged before the process group goes: wrap destroy_process_group
        (also where the script imported it by name, as torch's DDP tutorial does), and, for a
        script that neither detaches nor destroys the group, flush at interpreter exit (a run
        shorter than one flush window stored nothing at all)."""
        original = dist.destroy_process_group

        @functools.wraps(original)
        def destroy(*args, **kwargs):
            if self._restore is None:  # detached (another watch's wrapper still calls this one)
                return original(*args, **kwargs)
            self.restore()
            in_flight = sys.exc_info()[1]  # called from a `finally:` while an error ends this rank
            self._end(flush, _ended_on(in_flight), DESTROY_WAIT)
            return original(*args, **kwargs)

        self._rebound = patches.importers(original)
        for module in [dist, *self._rebound]:
            module.destroy_process_group = destroy
        self._restore = original, destroy
        self._at_exit = functools.partial(self._flush_at_exit, flush)
        atexit.register(self._at_exit)

    def _flush_at_exit(self, flush) -> None:
        """At interpreter exit. A rank ending on an uncaught exception (Python keeps it in
        sys.last_value) makes no exchange: see abandon."""
        self.restore()
        self._end(flush, _ended_on(getattr(sys, "last_value", None)), END_WAIT)

    def _end(self, flush, error: str, wait: float) -> None:
        """The last flush. Its exchange is made only when every rank of the group has come to its
        end too: a rank that leaves the training early (sys.exit(1) on a bad shard, an error
        caught by a `finally: destroy_process_group()`) would otherwise wait in it for the group's
        timeout (30 minutes by default) while the others wait in the training's next collective;
        unwatched, torchrun ends such a run in seconds. Ranks that disagree keep their last window
        as each measured it (and say so in a distributed_error event)."""
        if error and not self._abandoned:
            self.abandon(error, said=False)
        elif not self._abandoned and not self._failed and dist.is_initialized() and not self._all_at_end(wait):
            self.abandon(f"the other ranks did not reach their end within {wait:g} s", said=False)
        flush()

    def _all_at_end(self, wait: float) -> bool:
        """Whether every rank of the group reaches its end within `wait` seconds, agreed through
        the group's key-value store (no collective, so nothing waits longer). The rank that
        arrives last, or the first to give up, writes the decision; whichever is first stands."""
        try:
            store = dist.distributed_c10d._get_default_store()
            name = getattr(self.group, "group_name", None) or "default"
            key = f"gradwatch/end/{name}/{next(_ENDS)}"
            if store.add(f"{key}/arrived", 1) >= self.world:
                store.compare_set(f"{key}/decision", "", "go")
            deadline = time.monotonic() + wait
            while not store.check([f"{key}/decision"]) and time.monotonic() < deadline:
                time.sleep(0.005)  # (polled: a store wait that times out prints C++ warnings)
            return store.compare_set(f"{key}/decision", "", "stop") == b"go"
        except Exception:  # no store to agree through (torch internals moved): exchange as before
            return True

    def restore(self) -> None:
        if self._restore is not None:
            original, wrapper = self._restore
            for module in [dist, *self._rebound]:
                if getattr(module, "destroy_process_group", None) is wrapper:
                    module.destroy_process_group = original
            self._restore = None
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None


# Seconds a rank at its end waits for the others before it keeps its last window as it measured
# it. At interpreter exit a rank cannot tell a normal end from sys.exit(1) mid-training (the others
# then wait in the training's next collective): this is what such a run costs over an unwatched
# one. destroy_process_group is called by every rank on purpose (a rank ending on an error that a
# `finally:` catches is seen in flight and does not wait), so it waits long for a slow rank 0
# (a checkpoint written before it).
END_WAIT = 30.0
DESTROY_WAIT = 600.0
_ENDS = itertools.count()  # the ends agreed so far in this process (the same sequence on every rank)


def _ended_on(error: BaseException | None) -> str:
    return "" if error is None else f"it ended on {first_line(error)}"


def _scatter(n: int, index: list[int], tensors: list[torch.Tensor], device) -> torch.Tensor:
    """L2 norms of `tensors` at positions `index` of a length-n vector, MISSING elsewhere."""
    if len(index) == n:  # every parameter has a gradient: the common case, one fused call
        return foreach_norm32(tensors)
    out = torch.full((n,), MISSING, device=device)
    if index:
        values = foreach_norm32(tensors)
        out[torch.tensor(index, device=device)] = values
    return out


def _table(records: list, n: int) -> torch.Tensor:
    """One float64 row per step: [has loss, local loss, grad, grad_max, weight, delta, nonfinite]
    (n columns per parameter field; NaN where a step has no such field)."""
    table = torch.full((len(records), 2 + (len(_FIELDS) + 1) * n), math.nan, dtype=torch.float64)
    for row, rec in enumerate(records):
        if rec.loss_n:
            table[row, 0] = 1.0
            table[row, 1] = rec.loss_sum.double().cpu()
        else:
            table[row, 0] = 0.0
        for k, name in enumerate(_FIELDS):
            value = getattr(rec, name)
            if value is not None:
                table[row, 2 + k * n: 2 + (k + 1) * n] = value.double().cpu()
        counts = torch.zeros(n, dtype=torch.float64)
        for i, c in (rec.nonfinite or {}).items():
            counts[i] = c
        table[row, 2 + len(_FIELDS) * n:] = counts
    return table
