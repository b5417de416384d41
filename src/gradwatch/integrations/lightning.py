"""Lightning: `GradwatchCallback` records what `gradwatch.watch` records, into the same store,
and reports through the trainer's loggers.

    trainer = Trainer(callbacks=[GradwatchCallback()], gradient_clip_val=1.0)

The gradient norms are taken the moment each gradient is accumulated (post-accumulate-grad
hooks), that is before Lightning clips them in `configure_gradient_clipping`: they are the
pre-clip norms, logged as `gradwatch/grad_norm_preclip/<layer>` after each flush (every
`flush_every` steps, at the step each was taken). Findings are warned once each
(`rank_zero_warn`) and counted in `gradwatch/findings`. The store goes to `out`, default
`<trainer.default_root_dir>/gradwatch`: `gradwatch report` and `gradwatch diagnose` read it; a fit
from a global step above 0 (a second fit, `ckpt_path=`) continues the run stored there. Under DDP
the strategy's wrapper is watched: gradients after the all-reduce, one store written by rank 0.
With several optimizers the first one's steps are recorded (a second fit or a checkpoint's resume
continues from the first one's count, which the callback keeps in its checkpoint state, not from the
global step, which counts every optimizer's steps); a backward while `toggle_optimizer`
has switched its weights off (a GAN's discriminator loss) is left out.
"""

from __future__ import annotations

import os

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # the standalone package
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from gradwatch.errors import ConfigError
from gradwatch.integrations._trainer import Recorder

PREFIX = "gradwatch/"
GRAD_METRIC = PREFIX + "grad_norm_preclip/"


def _clipping(trainer: "pl.Trainer") -> str | None:
    """The Trainer's gradient clipping, as the run's metadata says it (None: no clipping)."""
    value = trainer.gradient_clip_val
    if not value:
        return None
    algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").rsplit(".", 1)[-1].lower()
    limit = f"each entry to ±{value:g}" if algorithm == "value" else f"the total norm to {value:g}"
    return f"{limit} (gradient_clip_val)"


class GradwatchCallback(pl.Callback):
    """Watch the LightningModule and the trainer's first optimizer from `on_train_start`.

    out: run directory for the store (default `<default_root_dir>/gradwatch`); every,
    sample_every, flush_every, stop_on: as for `gradwatch.watch`; log_grad_norms: send the
    per-layer pre-clip norms to the trainer's logger.
    """

    def __init__(self, out: str | os.PathLike | None = None, *, every: int = 1, sample_every: int = 10,
                 flush_every: int = 50, stop_on=(), log_grad_norms: bool = True):
        self.log_grad_norms = log_grad_norms
        self._trainer = None
        self._optimizer = None
        self._window: list[torch.Tensor] = []  # this step's micro-batch losses, as backward saw them
        self._count = 0
        # (trainer.global_step, watched steps) when the last training ended or a checkpoint was
        # saved: with several optimizers stepping (manual optimization) the global step counts
        # every optimizer's steps, the watched step only the first one's
        self._resume: tuple[int, int] | None = None
        self.recorder = Recorder(out, self._report, every=every, sample_every=sample_every,
                                 flush_every=flush_every, stop_on=stop_on, say=rank_zero_info)

    @property
    def watch(self):
        return self.recorder.watch

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.optimizers:
            raise ConfigError("GradwatchCallback needs an optimizer: configure_optimizers returned none")
        if len(trainer.optimizers) > 1:
            rank_zero_warn(f"gradwatch: {len(trainer.optimizers)} optimizers; watching the first only")
        self._trainer, self._optimizer, self._window = trainer, trainer.optimizers[0], []

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # here, not in on_fit_start: a checkpoint's global step is restored in between, and a
        # resumed (or second) fit continues the run from it
        out = os.path.join(trainer.default_root_dir, "gradwatch")
        # under DDP/FSDP the strategy's wrapper is watched: the gradients are read after its
        # all-reduce and rank 0 writes one store, as under `gradwatch run -- torchrun`
        wrapped = trainer.strategy.model if trainer.world_size > 1 else None
        distributed = wrapped is not None and wrapped is not pl_module
        rank_dir = f"rank{trainer.global_rank}" if trainer.world_size > 1 and not distributed else None
        watch = self.recorder.start(wrapped if distributed else pl_module, trainer.optimizers[0], out,
                                    f"lightning {pl.__version__}", rank_dir,
                                    writer=not distributed or trainer.global_rank == 0,
                                    first_step=self._first_step(trainer), grad_clip=_clipping(trainer))
        watch.on_flush.append(lambda w: self._log_flushed())

    def _first_step(self, trainer: "pl.Trainer") -> int:
        """The watched step this fit starts at: where the last fit (or the checkpoint resumed
        from) left the watched optimizer, when the trainer resumes at the global step it had then;
        else the global step (one optimizer: the same count)."""
        if self._resume is not None and self._resume[0] == trainer.global_step:
            return self._resume[1]
        return trainer.global_step

    def _watched_steps(self) -> tuple[int, int] | None:
        if self.recorder.watch is None or self._trainer is None:
            return self._resume
        return self._trainer.global_step, self.recorder.watch.step

    def state_dict(self) -> dict:
        steps = self._watched_steps()
        return {} if steps is None else {"global_step": steps[0], "watched_step": steps[1]}

    def load_state_dict(self, state_dict: dict) -> None:
        if "global_step" in state_dict and "watched_step" in state_dict:
            self._resume = (int(state_dict["global_step"]), int(state_dict["watched_step"]))

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss) -> None:
        # toggle_optimizer(other) froze the watched optimizer's weights: this backward (a GAN's
        # discriminator loss) is another optimizer's, and its loss is not the watched step's
        watch = self.recorder.watch
        if watch is not None and not any(p.requires_grad for g in self._optimizer.param_groups for p in g["params"]):
            watch.pause()
        elif pl_module.automatic_optimization:
            self._window.append(loss.detach())

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        # the epoch's last step may have fewer micro-batches than accumulate_grad_batches, each
        # still divided by it: the sum of what backward saw is not their mean there
        window, self._window = self._window, []
        acc = trainer.accumulate_grad_batches
        if self.recorder.watch is not None and 0 < len(window) < acc:
            scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: the losses are scaled
            total = torch.stack(window).float().sum() / (scaler.get_scale() if scaler is not None else 1.0)
            self.recorder.watch.record_loss(total * acc / len(window))

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.recorder.watch is not None:
            self.recorder.watch.resume()

    def _loggers(self) -> list:
        """Every logger of the trainer, as Lightning's own `self.log` uses them: with
        `logger=[TensorBoardLogger, CSVLogger]` only the first one (`trainer.logger`) got these."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return []
        return list(getattr(trainer, "loggers", None) or ([trainer.logger] if trainer.logger is not None else []))

    def _log_flushed(self) -> None:
        loggers = self._loggers() if self.log_grad_norms else []
        if not loggers:
            return  # nothing to log to: the store is not read
        for row in self.recorder.new_steps():
            metrics = {GRAD_METRIC + layer: v for layer, m, v in row.values if m == "grad_norm"}
            if metrics:
                for logger in loggers:
                    logger.log_metrics(metrics, step=row.step)

    def _report(self, finding) -> None:
        self._count += 1
        rank_zero_warn(finding.line())
        for logger in self._loggers():
            logger.log_metrics({PREFIX + "findings": self._count}, step=max(finding.first_step, 0))

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._end(exception)

    def _end(self, error: BaseException | None = None) -> None:
        """The fit is over, or stopped on `error` (which the store then records)."""
        self._resume = self._watched_steps()
        self.recorder.finish(error)
        self._log_flushed()
        self.recorder.close()
