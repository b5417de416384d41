"""The update window of a step: when the weights before its update are taken, and when its
update ‖Δw‖ is complete (docs/statistics.md, `update_ratio`).

The window of a sampled step opens with a copy of the weights before its update and closes when
the update is complete: at the next backward for weights updated by hand, else after the watched
optimizer's step, or later, when another optimizer stepping watched weights (a partner: a GAN's
other model, a second part's optimizer) adds its update to the step whose gradients it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradwatch.collect import distributed
from gradwatch.collect.record import StepRecord
from gradwatch.collect.stats import MISSING, foreach_norm32

if TYPE_CHECKING:
    from gradwatch.collect.watch import Watch


class UpdateWindow:
    """One Watch's update window. It reads the watch's step state (its record, weights, optimizer,
    whether a backward came since the last step) and writes Δw and weight norms into the record."""

    def __init__(self, watch: "Watch") -> None:
        self._watch = watch
        self.snapshot: list[torch.Tensor] | None = None  # weights before the update, while one is due
        self.rec: StepRecord | None = None  # ... and the record it belongs to
        self._buf: list[torch.Tensor] | None = None
        # the watched optimizer stepped, and another's update may still belong to that step (see
        # partner); `_before`: weights before such an update, while it is undecided
        self.late = False
        self._before: dict[int, torch.Tensor] = {}
        # a partner stepped after the step's optimizer: a flush leaves its step's window open (else
        # a killed run loses at most the steps since the last flush, the last one included)
        self.partner_after = False
        self.partner_first = False  # a partner stepped before the watched optimizer's first step

    def close(self) -> None:
        """The last step's update ends here (a skipped step, a new optimizer): settle it, and
        forget the weights taken for a step that has no update."""
        self.settle(kept=True)
        self.drop()

    def drop(self) -> None:
        """Forget the weights taken (the step they were for has no update, or starts again)."""
        self.snapshot, self.rec = None, None

    def open_late(self) -> None:
        """The watched optimizer stepped: its window stays open for a partner stepping after it."""
        self.late, self._before = True, {}

    def local_params(self) -> list[torch.Tensor]:
        """The watched weights as this rank holds them (a shard's local part under FSDP), detached."""
        return [distributed.local(p.detach()) for p in self._watch._params]

    def take(self, rec: StepRecord, params: list[torch.Tensor] | None = None) -> None:
        """Copy the weights before an update (`params`: else the weights now) into buffers kept
        between samples (allocating them each time costs more than the copy)."""
        params = params if params is not None else self.local_params()
        if self._buf is None or not all(map(_same_kind, self._buf, params)) or len(self._buf) != len(params):
            # (again when the model was moved or cast since: model.double() mid-run, rounded to the
            # old buffers' float32, read ratios of 5.1e-8 for 4.3e-8)
            self._buf = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._buf, params)
        self.snapshot = self._buf
        self.rec = rec

    def finish(self, after: list[torch.Tensor] | None = None) -> None:
        """Δw: `after` (else the weights now) minus the snapshot, in norms per parameter."""
        params = after if after is not None else self.local_params()
        rec = self.rec
        if len(params) == len(self.snapshot):
            others = self._not_held(rec.weight.device) if rec.weight is not None else None
            before = foreach_norm32(self.snapshot) if others is not None else None
            torch._foreach_sub_(self.snapshot, params)
            rec.delta = foreach_norm32(self.snapshot)
            if before is not None:
                rec.weight = self._weight_before(rec, before, others)
        self.drop()

    def _not_held(self, device: torch.device) -> torch.Tensor | None:
        """Which watched weights the watched optimizer does not hold (all, with none); None when it
        holds every one: then no weight norm is taken from the snapshot (a pass over the weights
        saved, ~6% of a sampled step of a 10-layer MLP)."""
        optimizer = self._watch._optimizer
        held = params_of(optimizer) if optimizer is not None else set()
        mask = [id(p) not in held for p in self._watch._params]
        return torch.tensor(mask, device=device) if any(mask) else None

    @staticmethod
    def _weight_before(rec: StepRecord, before: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """The weight norms of the step's record, with the snapshot's (`before`) for weights a
        partner (`others`) updated: read at a backward after its update (a GAN's discriminator
        stepped first, the generator's loss reaching it), they were the weights after it (D's ratio
        0.0229 for 0.0228). The watched optimizer's keep the hooks' (bitwise torch's norm). Weights
        no kept backward reached keep none, so no ratio, even where a partner moved them (the
        generator, under a watch with D's optimizer): diagnose reads a layer with weights and no
        gradient as cut off from the graph."""
        use = (rec.delta != 0) & others & (rec.weight != MISSING)
        return torch.where(use, before, rec.weight)

    def partner(self, optimizer: torch.optim.Optimizer) -> None:
        """Another optimizer is about to update watched weights: which step's Δw takes it. Right
        after the watched optimizer's step (a second part's optimizer, a GAN's generator after the
        discriminator) it is that step's: closed at the watched step, it fell in the next step's
        window (one step late, 0 at step 0). After a backward of its own it is undecided until the
        watched optimizer steps on those gradients (then it is the next step's: two parts, the
        partner first) or they are cleared unused (the last step's: a GAN's generator): the weights
        before it are kept until then (see settle)."""
        w = self._watch
        if self.late and w._backward_since_step and not self._reached_watched_optimizer():
            self.settle(kept=True)  # its own backward only (a WGAN's critic before the generator)
        if not self.late and w._step == 0:
            self.partner_first = True  # it steps before the watched optimizer has stepped once
        if self.late:
            self.partner_after = True
            if w._backward_since_step and (self.snapshot is not None or w._cur_sampled):
                held = params_of(optimizer)
                for i, p in enumerate(w._params):
                    if id(p) in held and i not in self._before:
                        self._before[i] = distributed.local(p.detach()).clone()
            return
        rec = w._current() if self.snapshot is None else None
        if rec is not None and rec.sampled:
            self.take(rec)

    def _reached_watched_optimizer(self) -> bool:
        """A backward since the last step gave gradients to weights the watched optimizer holds
        (distributed: gradients are read after backward, so assumed)."""
        w = self._watch
        held = params_of(w._optimizer)
        return w._dist is not None or any(t and id(p) in held for t, p in zip(w._touched, w._params))

    def settle(self, kept: bool) -> None:
        """End the watched optimizer's last step's update window (see partner). `kept`: the
        backwards since it are the next step's (the watched optimizer steps on them): updates of
        partners after them go to the next step. Else they went unused: those updates are the last
        step's, and a window the next step opened before them (zero-code mode opens one at any
        other optimizer's step) starts again at its own."""
        if not self.late:
            return
        self.late = False
        kept_before, self._before = (self._before if kept else {}), {}
        w = self._watch
        if self.snapshot is not None and self.rec is w._cur:  # the next step's
            if not kept:
                self.drop()
            return
        if self.snapshot is None and not kept_before:  # (most steps: nothing sampled)
            return
        params = self.local_params()
        before = [kept_before.get(i, p) for i, p in enumerate(params)]
        if self.snapshot is not None:
            self.finish(before)
        rec = w._current() if kept_before else None
        if rec is not None and rec.sampled and w._params:
            self.take(rec, before)


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def params_of(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of every parameter `optimizer` holds, in all its groups."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}
