"""Ioffe & Szegedy (2015): 3 hidden sigmoid layers of 100, with and without batch norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradwatch.lab import data, nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.page import figure, save
from gradwatch.lab.plots import loss_curves
from gradwatch.lab.train import train

SIGMA, LR, EVERY = 0.1, 0.5, 10
PERCENTILES = (15, 50, 85)


def make(bn: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nets.mlp(64, 100, 3, 10, "sigmoid", "torch", bn=bn)
    for m in model.modules():
        if isinstance(m, nn.Linear):  # small Gaussian initialisation, as in the paper's MNIST experiment
            nn.init.normal_(m.weight, 0.0, SIGMA)
            nn.init.zeros_(m.bias)
    return model


def train_recording(bn: bool, task, steps: int, progress: Progress):
    """Train, recording the 15/50/85th percentiles of the last sigmoid's input (over the batch and the
    units) every EVERY steps, as the network sees them in training."""
    model = make(bn)
    record, on = [], [False]

    def hook(module, args, output):
        if on[0]:
            record.append(np.percentile(args[0].detach().numpy(), PERCENTILES))

    handle = model.act3.register_forward_hook(hook)

    def every_step(step, _model):
        on[0] = step % EVERY == 0

    r = train(model, task, steps=steps, lr=LR, seed=0, label="with BN" if bn else "without BN",
              every_step=every_step, progress=progress)
    handle.remove()
    return r, np.array(record)


def drift(pcts: np.ndarray) -> float:
    """Mean over the percentiles of their range (max − min) after the first tenth of training."""
    tail = pcts[len(pcts) // 10:]
    return float(np.mean(tail.max(0) - tail.min(0)))


def run(quick: bool, out: Path, progress: Progress) -> Result:
    steps = 500 if quick else 3000
    task = data.digits()
    res = Result(["net", "mean loss, first half", "final loss", "test accuracy", "percentile drift"], [])
    res.notes += [f"3 hidden sigmoid layers of 100, weights N(0, {SIGMA}²), SGD lr {LR}, batch 64, {steps} steps on digits",
                  f"percentiles {PERCENTILES} of the input to the last sigmoid (pooled over batch and units) every "
                  f"{EVERY} steps; drift = their mean range after the first tenth of training"]
    progress.phase("training with and without BN", 2 * steps)
    runs, pcts, half, drifts = {}, {}, {}, {}
    for bn in (False, True):
        r, p = train_recording(bn, task, steps, progress)
        runs[bn], pcts[bn] = r, p
        half[bn], drifts[bn] = float(np.mean(r.losses[: steps // 2])), drift(p)
        res.rows.append([r.label, half[bn], r.final_loss(), r.test, drifts[bn]])
    res.check("BN trains faster: mean training loss over the first half < 0.5 × without BN",
              half[True] < 0.5 * half[False], with_bn=half[True], without_bn=half[False])
    res.check("BN keeps the pre-activation percentiles stable: drift < 0.5 × without BN",
              drifts[True] < 0.5 * drifts[False], with_bn=drifts[True], without_bn=drifts[False])
    fig, (a, b, c) = figure(3)
    loss_curves(a, list(runs.values()))
    percentile_panels((b, c), (pcts[False], pcts[True]))
    res.figures.append(save(fig, out, "batchnorm"))
    return res


def percentile_panels(axes, recorded) -> None:
    """The percentiles without and with BN, on one y range: the figure compares their stability, and
    each panel scaled to its own data would draw a drift of 0.2 as tall as one of 1."""
    low = min(float(np.min(p)) for p in recorded)
    high = max(float(np.max(p)) for p in recorded)
    pad = 0.05 * (high - low)
    for ax, p, bn in zip(axes, recorded, (False, True)):
        x = np.arange(len(p)) * EVERY
        for i, q in enumerate(PERCENTILES):
            ax.plot(x, p[:, i], label=f"{q}th percentile")
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(f"input to the last sigmoid, {'with' if bn else 'without'} BN", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("input to the last sigmoid (percentiles)")
        ax.legend(fontsize=7)


EXPERIMENT = Experiment(
    name="batchnorm",
    title="batch normalization (Ioffe & Szegedy 2015)",
    claim="Normalising each layer's pre-activations over the batch keeps their distribution stable during "
          "training and lets a sigmoid network train faster.",
    expected="with BN, lower loss early (mean over the first half < 0.5× without) and a pre-activation "
             "percentile drift less than half of the un-normalised net's.",
    source="Ioffe & Szegedy 2015, Batch Normalization (Fig. 1)",
    run=run,
)
