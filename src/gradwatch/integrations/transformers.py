"""Hugging Face: `GradwatchCallback` for `transformers.Trainer` records what `gradwatch.watch`
records, into the same store, and reports findings through transformers' logger.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradwatchCallback()])

The gradient norms are taken as each gradient is accumulated (post-accumulate-grad hooks), so
before the Trainer clips them (`max_grad_norm`): pre-clip, the same quantity as the `grad_norm`
the Trainer logs (the total norm `clip_grad_norm_` returns before clipping). The store goes to
`out`, default `<args.output_dir>/gradwatch`; at the end of training the findings are written
to OUT/findings.json and `gradwatch report OUT` draws the run; a training resumed from a
checkpoint (`resume_from_checkpoint=`) continues the run stored there. Under DDP the Trainer's wrapper is
watched: gradients after the all-reduce, one store written by rank 0.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from gradwatch.collect.distributed import ddp_wrapper
from gradwatch.integrations._trainer import Recorder

logger = logging.get_logger("gradwatch")


def _clipping(args) -> str | None:
    """The Trainer's gradient clipping, as the run's metadata says it (None: no clipping)."""
    return f"the total norm to {args.max_grad_norm:g} (max_grad_norm)" if args.max_grad_norm else None


class GradwatchCallback(TrainerCallback):
    """Watch the Trainer's model and optimizer from `on_train_begin`.

    out: run directory for the store (default `<output_dir>/gradwatch`); every, sample_every,
    flush_every, stop_on: as for `gradwatch.watch`.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, every: int = 1, sample_every: int = 10,
                 flush_every: int = 50, stop_on=()):
        self.recorder = Recorder(out, self._report, every=every, sample_every=sample_every,
                                 flush_every=flush_every, stop_on=stop_on, say=self._say)
        self._zero = True

    @property
    def watch(self):
        return self.recorder.watch

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import transformers

        self._zero = state.is_world_process_zero
        out = os.path.join(args.output_dir, "gradwatch")
        # under DDP the wrapper is watched: gradients read after its all-reduce, rank 0 writes one
        # store, as under `gradwatch run -- torchrun`; other multi-process set-ups: one store per rank
        wrapped = ddp_wrapper(model) if args.world_size > 1 and torch.distributed.is_initialized() else None
        rank_dir = f"rank{args.process_index}" if args.world_size > 1 and wrapped is None else None
        self.recorder.start(model if wrapped is None else wrapped, optimizer, out,
                            f"transformers {transformers.__version__}", rank_dir,
                            writer=wrapped is None or args.process_index == 0, first_step=state.global_step,
                            grad_clip=_clipping(args))

    def _report(self, finding) -> None:
        if self._zero:
            logger.warning(finding.line())

    def _say(self, text: str) -> None:
        # warning level, as the findings: transformers shows no info unless asked
        if self._zero:
            logger.warning(text)

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.finish()
        self.recorder.close()
