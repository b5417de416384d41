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

After `patience` consecutive bad steps the guard restores the last snapshot (parameters and
``optimizer.state_dict()``, taken every `snapshot_every` good steps, at the first good step
included) and multiplies every param group's lr by `lr_factor`. Snapshots are taken before the
step's update, so a restore goes back at most `snapshot_every` good steps; each costs one copy of
the parameters and optimizer state, kept on their own device.

Beside ``torch.amp.GradScaler``: the scaler skips ``optimizer.step()`` itself when it finds an
overflow, so the guard never sees those steps and does not count them. Optimizers that handle the
scaler themselves (``_step_supports_amp_scaling``, e.g. fused Adam) are called with the scaler's
``found_inf``; the guard passes such steps through, since their gradients are still scaled and the
optimizer skips overflow steps on its own. Steps given a closure (LBFGS) are passed through too:
their gradients do not exist until the closure runs inside the step.
"""

from __future__ import annotations

import copy
import types
import warnings
from typing import Any, Callable

import torch

from gradwatch.collect import patches
from gradwatch.collect.stats import entries
from gradwatch.errors import ConfigError
from gradwatch.remedies._common import in_range, optimizer_params


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


class Guard:
    """Skips non-finite steps, counts them, restores and lowers the lr after `patience` in a row."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, patience: int = 3, lr_factor: float = 0.5,
                 snapshot_every: int = 100) -> None:
        optimizer_params(optimizer)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"patience={patience!r} must be a whole number >= 1 (bad steps in a row before a restore)")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ConfigError(f"snapshot_every={snapshot_every!r} must be a whole number >= 1")
        self.optimizer = optimizer
        self.patience = patience
        self.lr_factor = in_range("lr_factor", lr_factor, 0.0, 1.0, lo_open=True, hi_open=False)
        self.snapshot_every = snapshot_every
        self.steps = 0          # steps the guard let through
        self.skipped = 0        # steps it skipped
        self.consecutive = 0    # skipped in a row, right now
        self.restores = 0
        self.passed_through = 0  # closure / scaler-managed steps it did not check
        self._snapshot: tuple[int, list[torch.Tensor], dict] | None = None
        self._warned = False
        self._had_own_step = "step" in vars(optimizer)
        self._original = optimizer.step
        self._attached = True
        self._wrapped = types.MethodType(_guarded_step(self), optimizer)  # one object, so remove() knows it
        optimizer.step = self._wrapped  # type: ignore[method-assign]

    # -- the wrapped step ---------------------------------------------------------------------
    def _step(self, *args: Any, **kwargs: Any) -> Any:
        opt = self.optimizer
        if args or kwargs.get("closure") is not None or "found_inf" in kwargs or "grad_scaler" in kwargs \
                or getattr(opt, "found_inf", None) is not None:
            self.passed_through += 1
            return self._original(*args, **kwargs)
        params = optimizer_params(opt)
        grads = [entries(p.grad) for p in params if p.grad is not None]  # a sparse one: its values
        if all_finite(grads):  # the one host sync per step
            self.consecutive = 0
            if self.steps % self.snapshot_every == 0:
                self._take_snapshot(params)
            self.steps += 1
            return self._original(*args, **kwargs)
        self.skipped += 1
        self.consecutive += 1
        patches.guard_skipped(opt)  # a watch records it as a step with no update
        if not self._warned:
            self._warned = True
            bad = sum(1 for g in grads if not bool(torch.isfinite(g).all()))
            warnings.warn(f"gradwatch.guard: skipped optimizer step {self.steps + self.skipped}: {bad} of "
                          f"{len(grads)} gradient tensors hold NaN/Inf; weights and optimizer state left "
                          "unchanged (further skips are counted silently; see guard.report())", stacklevel=2)
        if self.consecutive >= self.patience:
            self._restore(params)
        return None

    def _take_snapshot(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            data = [p.detach().clone() for p in params]
        self._snapshot = (self.steps, data, copy.deepcopy(self.optimizer.state_dict()))

    def _restore(self, params: list[torch.Tensor]) -> None:
        opt = self.optimizer
        old = [g["lr"] for g in opt.param_groups]
        where = "no good step yet: weights kept"
        if self._snapshot is not None:
            step, data, state = self._snapshot
            with torch.no_grad():
                for p, d in zip(params, data):
                    p.copy_(d)
            opt.load_state_dict(copy.deepcopy(state))  # a copy: the snapshot must survive later steps
            where = f"weights and optimizer state restored to good step {step}"
        for group, lr in zip(opt.param_groups, old):
            group["lr"] = lr * self.lr_factor
        self.restores += 1
        self.consecutive = 0
        new = ", ".join(f"{g['lr']:.3g}" for g in opt.param_groups)
        warnings.warn(f"gradwatch.guard: {self.patience} non-finite steps in a row; {where}; "
                      f"lr multiplied by {self.lr_factor:g} (now {new})", stacklevel=3)

    # -- reporting and removal --------------------------------------------------------------------
    def report(self) -> str:
        """One line: what the guard did so far."""
        total = self.steps + self.skipped
        lrs = ", ".join(f"{g['lr']:.3g}" for g in self.optimizer.param_groups)
        return (f"guard: {self.skipped} of {total} steps skipped (non-finite gradients), "
                f"{self.restores} restore(s), lr now {lrs}")

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


def _guarded_step(g: Guard) -> Callable[..., Any]:
    """The replacement step, as a function of the optimizer: torch's LR schedulers re-wrap
    ``optimizer.step`` by binding its ``__func__`` to the optimizer, so the guard must be reached
    through a closure, not through ``self``."""
    def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        return g._step(*args, **kwargs) if g._attached else g._original(*args, **kwargs)
    return step


def guard(optimizer: torch.optim.Optimizer, *, patience: int = 3, lr_factor: float = 0.5,
          snapshot_every: int = 100) -> Guard:
    """Guard `optimizer` against non-finite steps; see the module docstring. Removable, a context manager."""
    return Guard(optimizer, patience=patience, lr_factor=lr_factor, snapshot_every=snapshot_every)
