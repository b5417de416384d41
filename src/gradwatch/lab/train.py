"""One seeded training run under `gradwatch.watch`: the lab measures with the product itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.errors import ConfigError
from gradwatch.lab.base import NULL_PROGRESS, Progress
from gradwatch.lab.data import Task
from gradwatch.store.series import RunSeries

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "nadam": lambda params, lr: torch.optim.NAdam(params, lr=lr),
}


@dataclass
class Run:
    """What one training run gave: the watched series, the loss per step and the test score."""

    label: str
    series: RunSeries
    losses: np.ndarray  # training loss per step, from the watch; stops at the first non-finite one
    test: float  # accuracy for classification, MSE for regression (NaN if the run diverged)
    diverged_at: int | None  # first step whose loss was not finite
    model: nn.Module

    def final_loss(self, window: int = 20) -> float:
        """Mean training loss over the last `window` steps (inf if the run diverged)."""
        if self.diverged_at is not None:
            return math.inf
        return float(np.mean(self.losses[-window:]))


def evaluate(model: nn.Module, task: Task) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(task.x_test)
    model.train(was_training)
    if task.loss == "ce":
        return float((pred.argmax(1) == task.y_test).float().mean())
    return float(((pred - task.y_test) ** 2).mean())


def train(
    model: nn.Module,
    task: Task,
    *,
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    batch: int = 64,
    seed: int = 0,
    label: str = "",
    sample_every: int = 10,
    clip: Callable[[list[torch.Tensor]], object] | None = None,
    every_step: Callable[[int, nn.Module], None] | None = None,
    progress: Progress = NULL_PROGRESS,
) -> Run:
    """Train `model` on `task` for `steps` steps under a watch (in memory). The batch stream is fixed
    by `seed`; the caller seeds the model's initialisation. `clip(params)` runs between backward and
    the update; `every_step(step, model)` before each step (for extra measurements)."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected one of {sorted(OPTIMIZERS)}")
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params, lr)
    loss_fn = nn.CrossEntropyLoss() if task.loss == "ce" else nn.MSELoss()
    diverged = None
    model.train()
    # warn=False: no live findings on stderr; the experiments call diagnose themselves where they need it
    with gradwatch.watch(model, opt, sample_every=sample_every, flush_every=max(steps, 1), warn=False) as w:
        for step in range(steps):
            if every_step is not None:
                every_step(step, model)
            x, y = task.batch(gen, batch)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                clip(params)
            opt.step()
            if step % 10 == 9:
                progress.advance(10)
            if not math.isfinite(float(loss.detach())):
                diverged = step
                break
        series = w.series()
    progress.advance(steps - (step + 1) // 10 * 10 if steps else 0)
    losses = series.loss.copy()
    test = math.nan if diverged is not None else evaluate(model, task)
    return Run(label, series, losses, test, diverged, model)


class FirstWeightGradients:
    """`every_step` callback: each Linear's ‖∂L/∂W‖ (weights only) of step 0, in forward order. The
    watch's grad_norm joins weights and biases, and at init the bias part can dominate a ratio
    across layers (Glorot & Bengio 2010, eq. 14: ∂L/∂W stays level while ∂L/∂s shrinks). Read at
    the start of step 1, when .grad still holds step 0's gradients (optimizers leave it in place)."""

    def __init__(self):
        self.norms = np.array([])

    def __call__(self, step: int, model: nn.Module) -> None:
        if step == 1:
            self.norms = np.array([float(m.weight.grad.norm()) for m in model.modules() if isinstance(m, nn.Linear)])


def per_layer(series: RunSeries, metric: str, row: int, role: str = "param",
              types: tuple[str, ...] = ("Linear",)) -> tuple[list[str], np.ndarray]:
    """One recorded row (0 = first step, -1 = last sampled) of `metric` for the layers of a role
    and module types, in forward order. Sampled metrics: `row` counts sampled steps only."""
    cols = [i for i, l in enumerate(series.layers) if l.role == role and (not types or l.type in types)]
    cols.sort(key=lambda i: series.layers[i].index)
    values = series.metrics[metric][:, cols]
    rows = values[~np.all(np.isnan(values), axis=1)]
    return [series.layers[i].name for i in cols], rows[row] if len(rows) else np.full(len(cols), np.nan)

