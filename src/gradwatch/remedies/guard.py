"""gw.guard(optimizer): a step whose gradients hold NaN/Inf never reaches the weights.

How: the guard replaces ``optimizer.step`` on that one optimizer object (``remove()`` puts the
original back). Before calling the real step it computes, on the device, whether every gradient's
2-norm is finite (one ``torch._foreach_norm`` pass) and reads that one flag on the host; only a
step that fails it is checked element by element, so a huge-but-finite gradient whose sum of
squares overflows is not mistaken for a non-finite one. That is one host sync per step, on purpose:
skipping a step is a decision, and the alternative (snapshot every parameter and optimizer state
tensor, step, then ``torch.where`` them back) costs several copies of the model per step: 2.3x
the step time against 1.02x for the sync on CPU, both measured in benchmarks/clip_overhead.py.
A skipped step does not call the real step at all, so weights, optimizer state (Adam moments,
step count), step hooks and LR schedulers are untouched.

After `patience` consecutive bad steps the guard restores the last snapshot and multiplies every
param group's lr by `lr_factor`. A snapshot holds each parameter's values and ``optimizer.state``
entry (where torch's optimizers keep all their state), keyed by the parameter itself; it is taken
every `snapshot_every` good steps, at the first good step included, and again at the first good
step after parameters joined or left the optimizer (``add_param_group``). A restore puts back every
current parameter the snapshot holds and leaves the others (added since, so never stepped) as they
are; group settings other than the lrs stay as they are. Snapshots are taken before the step's
update, so a restore goes back at most `snapshot_every` good steps; each costs one copy of the
parameters and optimizer state, kept on their own device.

The lr cut must survive the LR scheduler's next step. The guard scales every param-group key
torch's schedulers compute the lr from (``lr``, ``initial_lr``, ``max_lr``, ``min_lr``): enough for
those that step from the current lr (StepLR, MultiStepLR, ExponentialLR, LinearLR, ReduceLROnPlateau,
...) and for OneCycleLR. Those that compute it from lrs kept on the scheduler object (LambdaLR,
CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR, SequentialLR's milestones) cannot be found
from the optimizer: given as ``scheduler=`` (or to ``add_scheduler``, for one built later), their
``base_lrs``, ``eta_min``, ... are scaled too; otherwise their next step undoes the cut, and the
restore's warning says so when a scheduler drives the optimizer.

Under FSDP each rank holds a shard of the gradients: the ranks agree on every skip with one
one-element all-reduce per step (`agreed`), so none steps its shard while another skips.

Beside ``torch.amp.GradScaler``: the scaler skips ``optimizer.step()`` itself when it finds an
overflow, so the guard never sees those steps and does not count them. Optimizers that handle the
scaler themselves (``_step_supports_amp_scaling``, e.g. fused Adam) are called with the scaler's
``found_inf``; the guard passes such steps through, since their gradients are still scaled and the
optimizer skips overflow steps on its own. A step given a closure is checked when the optimizer is
one of torch's that runs the closure once before its update (SGD, Adam, ...): the guard runs it,
then checks. LBFGS calls it many times inside the step, moving the weights between calls: each call's
gradients are checked, and a bad one ends the step, which is undone. Optimizers from elsewhere are
passed through unchecked.
"""

from __future__ import annotations

import copy
import numbers
import os
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from gradwatch.collect import patches
from gradwatch.collect.stats import entries
from gradwatch.errors import ConfigError
from gradwatch.remedies._common import in_range, optimizer_params, shown, whole_number
from gradwatch.remedies._sharded import agreed, flag_device, local, shard_group

Scheduler = Union[LRScheduler, ReduceLROnPlateau]

# What torch's LR schedulers compute the lr from: these param-group keys (OneCycleLR reads them all;
# every scheduler takes its base lrs from initial_lr when built) and these scheduler attributes.
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "min_lrs", "default_min_lr", "eta_min", "_last_lr")


def norms_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """On-device bool: the 2-norm of every gradient is finite (one foreach pass, no host sync).

    False for any NaN/Inf entry, and also (rarely) for finite entries so large (> ~1e19 in
    float32) that the sum of squares overflows; `all_finite` settles those on the host.
    """
    if not grads:
        return torch.ones((), dtype=torch.bool)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    first = grads[0].device
    flags = [torch.isfinite(torch.stack(torch._foreach_norm(group))).all().to(first) for group in groups.values()]
    return torch.stack(flags).all()


def all_finite(grads: list[torch.Tensor]) -> bool:
    """Every entry of every gradient is finite: the guard's one host sync per step.

    The fast check is the 2-norms (the inf-norm would be exact but is ~20x slower on CPU); only a
    step that fails it gets the exact element-wise check.
    """
    if bool(norms_finite(grads)):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


@dataclass
class Snapshot:
    """Parameters and their optimizer state at one good step, keyed by parameter identity, so that
    param groups added or edited since cannot misalign a restore."""

    step: int
    saved: dict[int, tuple[torch.Tensor, torch.Tensor, dict]]  # id(param): (param, its values, its state)

    @classmethod
    def take(cls, step: int, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> "Snapshot":
        with torch.no_grad():
            data = [p.detach().clone() for p in params]
        states = copy.deepcopy([optimizer.state.get(p, {}) for p in params])  # one copy: shared tensors stay shared
        return cls(step, {id(p): item for p, item in zip(params, zip(params, data, states))})

    def covers(self, params: list[torch.Tensor]) -> bool:
        """Holds exactly these parameters: none joined or left the optimizer since."""
        return len(params) == len(self.saved) and all(id(p) in self.saved for p in params)

    def restore(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
        """Put back the values and state of every parameter in `params` the snapshot holds at its
        current shape; returns how many it does not hold (they are left as they are)."""
        held = [self.saved[id(p)] for p in params if id(p) in self.saved and self.saved[id(p)][1].shape == p.shape]
        states = copy.deepcopy([state for _, _, state in held])  # first, and a copy: the snapshot must survive
        with torch.no_grad():
            for (p, data, _), state in zip(held, states):
                p.copy_(data)
                if state:
                    optimizer.state[p] = state
                else:  # no state yet at the snapshot: the optimizer initialises it again
                    optimizer.state.pop(p, None)
        return len(params) - len(held)


def _scaled(value: Any, factor: float) -> Any:
    """value * factor; a tensor in place, since torch's schedulers keep the lr tensors they were given."""
    return value.mul_(factor) if isinstance(value, torch.Tensor) else value * factor


def _with_chained(schedulers: list[Scheduler]) -> list[Scheduler]:
    """The schedulers and those they chain (SequentialLR, ChainedScheduler), each once."""
    found: dict[int, Scheduler] = {}

    def visit(s: Scheduler) -> None:
        if id(s) not in found:
            found[id(s)] = s
            for child in getattr(s, "_schedulers", ()):
                visit(child)
    for s in schedulers:
        visit(s)
    return list(found.values())


def cut_lr(optimizer: torch.optim.Optimizer, schedulers: list[Scheduler], factor: float) -> None:
    """Multiply by `factor` every lr the schedule is computed from, so the scheduler's next step
    keeps the cut: the param-group keys, and the lr attributes of the given schedulers."""
    for group in optimizer.param_groups:
        for key in _GROUP_LR_KEYS:
            if key in group:
                group[key] = _scaled(group[key], factor)
    for s in _with_chained(schedulers):
        for name in _SCHEDULER_LR_ATTRS:
            value = getattr(s, name, None)
            if isinstance(value, list):
                setattr(s, name, [_scaled(v, factor) for v in value])
            elif isinstance(value, (numbers.Real, torch.Tensor)) and not isinstance(value, bool):
                setattr(s, name, _scaled(value, factor))


class _NonFinite(Exception):
    """A guarded LBFGS closure left NaN/Inf gradients: ends the step there."""

    def __init__(self, loss: Any, grads: list[torch.Tensor]) -> None:
        super().__init__("non-finite gradients")
        self.loss, self.grads = loss, grads


class _UndoLBFGS:
    """What one LBFGS step changes, to put back: the weights, and its state with tensors cloned and
    lists copied (a step appends to and pops from its history lists and writes prev_flat_grad in
    place, but never changes a tensor its lists hold): about two copies of the weights, not its history."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        with torch.no_grad():
            self.weights = [(p, p.detach().clone()) for p in params]
        self.states = {p: {k: v.clone() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, list) else v
                           for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}

    def undo(self) -> None:
        with torch.no_grad():
            for p, w in self.weights:
                p.copy_(w)
        for p, _ in self.weights:
            if p in self.states:
                self.optimizer.state[p] = self.states[p]
            else:
                self.optimizer.state.pop(p, None)


def _closure_once(optimizer: torch.optim.Optimizer) -> bool:
    """A step(closure) of torch's own optimizers, but LBFGS, calls the closure once, first, and then
    updates from the gradients it left: the same as calling it and then step() without it. LBFGS
    calls it many times (`Guard._lbfgs_step`), and others (SAM) between two updates: those are passed
    through unchecked."""
    return type(optimizer).__module__.startswith("torch.optim.") and not isinstance(optimizer, torch.optim.LBFGS)


def _has_scheduler(*steps: object) -> bool:
    """One of these step functions is torch's LR-scheduler wrapper: a scheduler drives the optimizer."""
    return any(getattr(step, "_wrapped_by_lr_sched", False) for step in steps)


class Guard:
    """Skips non-finite steps, counts them, restores and lowers the lr after `patience` in a row."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, patience: int = 3, lr_factor: float = 0.5,
                 snapshot_every: int = 100, scheduler: Scheduler | list[Scheduler] | None = None,
                 process_group=None) -> None:
        params = optimizer_params(optimizer)
        earlier = getattr(optimizer.step, "guard", None)  # our step, or an LR scheduler's wrapper copying it
        if earlier is not None and earlier._attached:
            raise ConfigError(f"optimizer {type(optimizer).__name__} is already guarded ({earlier!r}); a second "
                              "guard would count every step again and restore on its own: use the first, or "
                              "call its remove() before guarding again")
        self.optimizer = optimizer
        self.patience = whole_number("patience", patience, fix="pass the bad steps in a row before a restore, e.g. 3")
        self.lr_factor = in_range("lr_factor", lr_factor, 0.0, 1.0, lo_open=True, hi_open=False)
        self.snapshot_every = whole_number("snapshot_every", snapshot_every, fix="pass e.g. 100")
        self.schedulers: list[Scheduler] = []
        if scheduler is not None:
            for s in scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]:
                self.add_scheduler(s)
        self.steps = 0          # steps the guard let through
        self.skipped = 0        # steps it skipped
        self.consecutive = 0    # skipped in a row, right now
        self.restores = 0
        self.passed_through = 0  # closure / scaler-managed steps it did not check
        # FSDP: the ranks holding shards decide each step together (FSDP2's mesh, FSDP1's world or `process_group`)
        self._group = process_group if process_group is not None else shard_group(params)
        self._snapshot: Snapshot | None = None
        self._warned = False
        self._had_own_step = "step" in vars(optimizer)
        self._original = optimizer.step
        self._attached = True
        self._wrapped = types.MethodType(_guarded_step(self), optimizer)  # one object, so remove() knows it
        optimizer.step = self._wrapped  # type: ignore[method-assign]

    # -- the wrapped step ---------------------------------------------------------------------
    def _step(self, *args: Any, **kwargs: Any) -> Any:
        opt = self.optimizer
        scaler_managed = "found_inf" in kwargs or "grad_scaler" in kwargs or getattr(opt, "found_inf", None) is not None
        closure = kwargs.get("closure", args[0] if len(args) == 1 else None)
        only_closure = closure is not None and not scaler_managed and len(args) + len(kwargs) == 1
        if only_closure and _closure_once(opt):
            # torch's SGD, Adam, ... run the closure once, under enable_grad, before their update: run it
            # here, then check its gradients and step on them as a step without closure would.
            with torch.enable_grad():
                loss = closure()
            self._step()
            return loss
        if only_closure and isinstance(opt, torch.optim.LBFGS):
            return self._lbfgs_step(closure)
        if args or kwargs.get("closure") is not None or scaler_managed:
            self.passed_through += 1
            return self._original(*args, **kwargs)
        params = optimizer_params(opt)
        grads = self._grads(params)
        if self._finite(grads, params):  # the one host sync per step
            self._good(params)
            return self._original(*args, **kwargs)
        self._skip(grads, params)
        return None

    def _grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's gradient entries: a sparse gradient's values, a DTensor's local shard."""
        return [local(entries(p.grad)) for p in params if p.grad is not None]

    def _finite(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
        finite = all_finite(grads)
        if self._group is not None:
            finite = agreed(finite, self._group, flag_device(self._group, local(params[0]).device))
        return finite

    def _good(self, params: list[torch.Tensor]) -> None:
        """A step about to update: snapshot first when one is due."""
        self.consecutive = 0
        if self._snapshot is None or self.steps % self.snapshot_every == 0 or not self._snapshot.covers(params):
            self._snapshot = Snapshot.take(self.steps, params, self.optimizer)
        self.steps += 1

    def _skip(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        self.skipped += 1
        self.consecutive += 1
        patches.guard_skipped(self.optimizer)  # a watch records it as a step with no update
        if not self._warned:
            self._warned = True
            bad = sum(1 for g in grads if not bool(torch.isfinite(g).all()))
            where = f"{bad} of {len(grads)} gradient tensors hold NaN/Inf" if bad else \
                "another rank's shard of the gradients holds NaN/Inf"
            call = self.steps + self.skipped - 1  # counted from 0, as the watch and its findings count steps
            warnings.warn(f"gradwatch.guard: skipped optimizer step {call} (the {_ordinal(call + 1)} step): "
                          f"{where}; weights and optimizer state left "
                          "unchanged (further skips are counted silently; see guard.report())", stacklevel=_user_level())
        if self.consecutive >= self.patience:
            self._restore(params)

    def _lbfgs_step(self, closure: Callable[[], Any]) -> Any:
        """LBFGS calls the closure many times a step, moving the weights between calls: each call's
        gradients are checked, and the first non-finite one ends the step, whose weights and state
        are then put back as they were before it (unchecked, one NaN made every weight NaN for good)."""
        opt = self.optimizer
        params = optimizer_params(opt)
        before = _UndoLBFGS(params, opt)

        def checked() -> Any:
            loss = closure()
            grads = self._grads(params)
            if not self._finite(grads, params):
                raise _NonFinite(loss, grads)
            return loss

        consecutive = self.consecutive
        try:
            self._good(params)  # counted good unless a call below finds otherwise
            return self._original(checked)
        except _NonFinite as bad:
            self.steps, self.consecutive = self.steps - 1, consecutive
            before.undo()
            self._skip(bad.grads, params)
            return bad.loss

    def _restore(self, params: list[torch.Tensor]) -> None:
        where = "no good step yet: weights kept"
        if self._snapshot is not None:
            missing = self._snapshot.restore(params, self.optimizer)
            where = f"weights and optimizer state restored to good step {self._snapshot.step}"
            if missing:
                where += f" ({missing} parameter(s) not in that snapshot kept as they are)"
        cut_lr(self.optimizer, self.schedulers, self.lr_factor)
        self.restores += 1
        self.consecutive = 0
        new = ", ".join(f"{g['lr']:.3g}" for g in self.optimizer.param_groups)
        warnings.warn(f"gradwatch.guard: {self.patience} non-finite steps in a row; {where}; "
                      f"lr multiplied by {self.lr_factor:g} (now {new}){self._schedule_note()}", stacklevel=_user_level())

    def _schedule_note(self) -> str:
        """What becomes of the lr cut at the scheduler's next step."""
        if self.schedulers:
            names = ", ".join(type(s).__name__ for s in self.schedulers)
            return f", as are the lrs {names} computes it from"
        if _has_scheduler(self._original, vars(self.optimizer).get("step")):
            return ("; an LR scheduler drives this optimizer but was not given to gw.guard(scheduler=...): if it "
                    "computes the lr from its base lrs (LambdaLR, CosineAnnealingLR, CyclicLR, SequentialLR, ...), "
                    "its next step undoes the cut")
        return ""

    def add_scheduler(self, scheduler: Scheduler) -> None:
        """Scale `scheduler`'s own lrs (base lrs, ...) too on a restore, so its next step keeps the cut;
        for one built after the guard (``gw.guard(scheduler=)`` takes those built before)."""
        if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)) or scheduler.optimizer is not self.optimizer:
            raise ConfigError(f"scheduler={shown(scheduler)} is not an LR scheduler of the guarded optimizer; pass the "
                              "torch.optim.lr_scheduler built on it, e.g. LambdaLR(optimizer, ...)")
        self.schedulers.append(scheduler)

    # -- reporting and removal --------------------------------------------------------------------
    def report(self) -> str:
        """One line: what the guard did so far."""
        total = self.steps + self.skipped
        lrs = ", ".join(f"{g['lr']:.3g}" for g in self.optimizer.param_groups)
        unchecked = (f", {self.passed_through} passed through unchecked (a non-torch optimizer's "
                     "closure, or GradScaler with an optimizer that skips overflow steps itself)") if self.passed_through else ""
        return (f"guard: {self.skipped} of {total} steps skipped (non-finite gradients), "
                f"{self.restores} restore(s), lr now {lrs}{unchecked}")

    summary = property(report)

    def remove(self) -> None:
        """Put the optimizer's own step back. When something wrapped the step after the guard (an
        LR scheduler does), that wrapper stays and the guard inside it passes every step through."""
        if not self._attached:
            return
        self._attached = False
        if vars(self.optimizer).get("step") is not self._wrapped:
            return
        if self._had_own_step:
            self.optimizer.step = self._original  # type: ignore[method-assign]
        else:
            del self.optimizer.step

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"<gradwatch {self.report()}>"


# Frames of gradwatch and torch (the guarded step, torch's LR-scheduler and profiler wrappers) stand
# between the user's optimizer.step() and a warning: skipped, so the warning names the user's line.
_INSIDE = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules["gradwatch"], torch))


def _user_level() -> int:
    """`stacklevel` for a warning raised here that points at the first caller outside gradwatch and torch."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _guarded_step(g: Guard) -> Callable[..., Any]:
    """The replacement step, as a function of the optimizer: torch's LR schedulers re-wrap
    ``optimizer.step`` by binding its ``__func__`` to the optimizer, so the guard must be reached
    through a closure, not through ``self``.

    A scheduler built before the guard has already wrapped the step it replaces: without the mark
    torch's wrapper carries, its first ``scheduler.step()`` would warn that "optimizer.step() has
    been overridden after learning rate scheduler initialization" (it has, but it still runs).
    The mark is kept, and a skipped step still counts as called, as the user did call it."""
    wrapped = getattr(g._original, "_wrapped_by_lr_sched", False)

    def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if wrapped:
            opt._opt_called = True  # what torch's wrapper sets; it is not reached on a skipped step
        return g._step(*args, **kwargs) if g._attached else g._original(*args, **kwargs)
    step.guard = g  # type: ignore[attr-defined]  # how a second gw.guard finds this one
    if wrapped:
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return step


def guard(optimizer: torch.optim.Optimizer, *, patience: int = 3, lr_factor: float = 0.5,
          snapshot_every: int = 100, scheduler: Scheduler | list[Scheduler] | None = None,
          process_group=None) -> Guard:
    """Guard `optimizer` against non-finite steps; see the module docstring. Removable, a context manager.
    Under FSDP the ranks agree on each skip by themselves; `process_group` overrides the group they
    agree over (FSDP1's default is the whole world)."""
    return Guard(optimizer, patience=patience, lr_factor=lr_factor, snapshot_every=snapshot_every,
                 scheduler=scheduler, process_group=process_group)
