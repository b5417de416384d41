"""A forgotten `optimizer.zero_grad()`: gradients carried from one optimizer step into the next.

Every backward adds into `p.grad`; cleared by nobody, the gradient a step uses is the sum of every
gradient so far. Checked on one small parameter of the step's optimizer, from the end of a sampled
step to its next step: the gradient the step left is copied, and before each backward in between
`p.grad` must still be exactly that copy (each backward then adds to it, and is copied again). A
clear (`zero_grad()`, `zero_grad(set_to_none=False)`, `p.grad = None`, `p.grad.data.zero_()`)
leaves None or zeros, never the nonzero copy; so the test is bitwise, with no tolerance: a
gradient nobody touched is its copy, whatever order AccumulateGrad's adds came in. The verdict
is taken at the next step of the same optimizer, after the last backward it uses (a GAN's
discriminator backward that wrote into the generator's gradients, cleared afterwards, is no
carry-over); with a closure (L-BFGS), whose backwards run inside the step, at its end. A step with
no backward since the copy (or none reaching the parameter) gives no verdict. Without an optimizer
(weights updated by hand) the verdict spans one whole update: from the first backward after the
parameter changed to the first after it changed again (a backward no update follows, such as an
attack's or a saliency map's, may run before the loop clears); unchanged, the backwards
accumulate on purpose. The comparisons
stay on the device: the host reads the verdicts at the flush.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from gradwatch.collect.update_window import params_of

STALE_KEY = "stale_gradients"  # the run's meta: the first carry-over and how many checks found one

MAX_WAIT = 8  # steps a copy waits for a backward that reaches its parameter (a head used on some steps only);
# by hand, backwards it waits for its parameter to change


class StaleCheck:
    """One armed check at a time: `arm` after a step, `before_backward` / `after_backward` around
    each backward, `settle` at the next step of the optimizer; `take` gives the verdicts so far."""

    def __init__(self) -> None:
        self.index = -1  # the checked parameter's position in the watch's list (-1: not armed)
        self._param: torch.Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._copy: torch.Tensor | None = None  # its gradient as last seen
        self._carried: torch.Tensor | None = None  # device bool: the copy is nonzero and untouched since
        self._informative: torch.Tensor | None = None  # device bool: the first copy is nonzero
        # (a weakref to an optimizer, its parameter count, the ids of its parameters)
        self._held: tuple[weakref.ref, int, set[int]] | None = None
        self._last = -1  # the parameter checked last time
        # parameters not to check again: a copy all zero (a WGAN critic's output bias), or, by hand,
        # a parameter the loop never updates
        self._skipped: set[int] = set()
        self._waited = 0  # steps the armed copy has waited (by hand: backwards with the parameter unchanged)
        self._cleared = False  # its gradient was set to None since the copy
        self._weight: torch.Tensor | None = None  # without an optimizer: the parameter as copied
        self._moved: int | None = None  # without an optimizer: the step the span began (an update seen since the copy)
        # (step, optimizer, index, carried, informative)
        self._verdicts: list[tuple[int, str, int, torch.Tensor | bool, torch.Tensor]] = []
        self.checks = 0  # verdicts read so far

    @property
    def armed(self) -> bool:
        return self._param is not None

    @torch.no_grad()
    def arm(self, optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor], touched: list[bool]) -> None:
        """Copy the gradient of one small parameter of `optimizer` that got a gradient in this step.
        None: weights updated by hand, each backward a step; its weights are copied too."""
        self.disarm()
        i = self._choose(optimizer, params, touched)
        if i < 0:
            return
        grad = params[i].grad
        self.index, self._param, self._optimizer = i, params[i], optimizer
        self._copy = grad.detach().clone()
        # a gradient all zero (a flat batch) cannot be told from a cleared one: no verdict then
        self._informative = self._copy.ne(0).any()
        self._carried = self._informative  # (never changed in place)
        self._waited = 0
        self._cleared = False
        self._weight = params[i].detach().clone() if optimizer is None else None
        self._moved = None  # (by hand) the step of the first backward after an update since the copy

    def _choose(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], touched: list[bool]) -> int:
        """The last parameter checked, while it stays eligible; else the smallest eligible one."""
        held = None if optimizer is None else self._held_by(optimizer)

        def eligible(i: int) -> bool:
            grad = params[i].grad
            return (touched[i] and grad is not None and not grad.is_sparse and i not in self._skipped
                    and (held is None or id(params[i]) in held))

        last = self._last
        if 0 <= last < len(params) and eligible(last):
            return last
        chosen = min((i for i in range(min(len(params), len(touched))) if eligible(i)),
                     key=lambda i: params[i].numel(), default=-1)
        self._last = chosen
        return chosen

    def _held_by(self, optimizer: torch.optim.Optimizer) -> set[int]:
        """ids of `optimizer`'s parameters, taken again when it is another or was given more."""
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        if self._held is None or self._held[0]() is not optimizer or self._held[1] != count:
            self._held = (weakref.ref(optimizer), count, params_of(optimizer))
        return self._held[2]

    @torch.no_grad()
    def before_backward(self, step: int) -> None:
        """The gradient must still be the copy: a backward is about to add to it. Without an
        optimizer, the verdict may come now (`_by_hand`)."""
        if self._param is None:
            return
        grad = self._param.grad
        if grad is None:
            self._cleared = True  # (a verdict still, at the step: a check that found none)
        elif grad.is_sparse or grad.shape != self._copy.shape:
            self.disarm()
        elif not self._cleared:
            self._carried = self._carried & (grad == self._copy).all()
        if self._param is not None and self._weight is not None:
            self._by_hand(step)

    def _by_hand(self, step: int) -> None:
        """Weights updated by hand: the verdict spans one whole update, from the first backward
        after an update to the first after the next, since backwards that no update follows (a
        saliency map, an FGSM attack's) may come before the loop clears: one seeing the last
        step's gradient is no carry-over if the training backward after it found it cleared.
        Unchanged weights: the backwards accumulate on purpose, and the wait goes on. (A host sync
        per backward while armed, after sampled steps only: the watch has no step hook here.)"""
        if not bool((self._param.detach() != self._weight).any()):
            self._waited += 1
            if self._waited > MAX_WAIT:  # a layer the loop never updates (a frozen backbone's): ask another
                self._skipped.add(self.index)
                self.disarm()
            return
        self._waited = 0
        if self._moved is None:  # the first update since the copy: the span starts at this step
            self._moved = step
            self._weight = self._param.detach().clone()
            return
        carried = False if self._cleared else self._carried
        self._verdicts.append((self._moved, "", self.index, carried, self._informative))
        self.disarm()

    @torch.no_grad()
    def after_backward(self) -> None:
        if self._param is None:
            return
        grad = self._param.grad
        if grad is not None and not self._cleared:
            if grad.is_sparse or grad.shape != self._copy.shape:
                self.disarm()
            else:
                self._copy.copy_(grad)

    def end_step(self, optimizer: torch.optim.Optimizer, step: int, params: list[torch.Tensor],
                 touched: list[bool], sampled: bool) -> None:
        """`optimizer` ended a step: a verdict if its backwards ran inside it (a closure); then a new
        copy after a sampled step, unless the armed one still waits for a backward to reach it."""
        self.settle(optimizer, step, touched)
        if self.armed and optimizer is self._optimizer and self._waited < MAX_WAIT:
            self._waited += 1
        elif sampled or self.armed:
            self.arm(optimizer, params, touched)

    def settle(self, optimizer: torch.optim.Optimizer, step: int, touched: list[bool]) -> None:
        """`optimizer` steps (or ended a step): a verdict if a backward since the copy reached the
        parameter. Left armed otherwise: the gradient has not moved, and the next step will tell."""
        if self._param is None or optimizer is not self._optimizer:
            return
        if self.index < len(touched) and touched[self.index]:
            carried = False if self._cleared else self._carried
            self._verdicts.append((step, type(optimizer).__name__, self.index, carried, self._informative))
            self.disarm()

    def forget_positions(self) -> None:
        """The watch's parameter list changed: positions name other parameters now."""
        self.disarm()
        self._last, self._skipped = -1, set()

    def disarm(self) -> None:
        self.index, self._param, self._optimizer, self._copy = -1, None, None, None
        self._carried = self._informative = self._weight = None

    def note(self, meta: dict, layer_of: Callable[[int], str]) -> None:
        """The verdicts since the last call into `meta[STALE_KEY]`, once one found a carry-over: its
        step, optimizer (`""`: updates by hand) and layer, how many checks from that step on there
        were and how many found one (a first model's correct loop is not counted in a second's)."""
        verdicts = self.take()
        self.checks += len(verdicts)
        carried = [(step, name, i) for step, name, i, over in verdicts if over]
        said = meta.get(STALE_KEY)
        if said is None and carried:
            step, name, i = carried[0]
            said = meta[STALE_KEY] = {"optimizer": name, "first_step": step, "layer": layer_of(i), "carried_over": 0,
                                      "checks": 0}
        if said is not None:
            said["carried_over"] += len(carried)
            said["checks"] += sum(1 for step, *_ in verdicts if step >= said["first_step"])

    def take(self) -> list[tuple[int, str, int, bool]]:
        """The verdicts since the last call, read on the host: (step, optimizer's class or "" for
        updates by hand, parameter index, carried over)."""
        out = []
        for step, name, i, carried, informative in self._verdicts:
            if bool(informative):
                out.append((step, name, i, bool(carried)))
            elif name:  # (by hand, unchanged weights say nothing of the parameter)
                self._skipped.add(i)  # its gradient is exactly 0: ask another one
        self._verdicts = []
        return out
