"""BatchNorm layers that do not normalise at the first step: the model trains in eval mode.

In training mode BatchNorm standardises each channel over the batch, and at initialisation
(weight 1, bias 0) its output has mean 0 and variance 1 exactly, so the activation after it has the
spread of f(N(0, 1)): ReLU 0.58, GELU 0.59, tanh 0.63 (measured on a 15-block digits MLP: 0.57 to
0.61 in every block). In eval mode it applies its running statistics instead, mean 0 and variance 1
at the start, and passes the pre-activation through unchanged (the same MLP after `model.eval()`:
0.04 to 0.16, a vanishing gradient of 2e-6 and 79% dead units, told to re-initialise, which left
it at 34% accuracy where `model.train()` reached 99%)."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnose.advice import listed
from gradwatch.diagnose.finding import Remedy
from gradwatch.diagnose.signals import from_init
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.series import RunSeries


def unnormalised_batchnorm(run: RunSeries, th: Thresholds) -> tuple[list[str], float] | None:
    """(the BatchNorm layers, the median spread of the activations after them) when, at the first
    step from initialisation, the activations after most BatchNorm layers at their initial weights
    spread less than `batchnorm_output_std`; else None."""
    std, w = run.metrics.get("act_std"), run.metrics.get("weight_norm")
    if std is None or w is None or not len(run.steps) or not from_init(run):
        return None
    order = sorted(range(len(run.layers)), key=lambda c: run.layers[c].index)
    pairs = [(c, a) for c, a in zip(order, order[1:]) if run.layers[c].type.startswith("BatchNorm")
             and run.layers[a].role == "activation" and _as_initialised(run, w[0, c], c) and np.isfinite(std[0, a])]
    if not pairs:
        return None
    spread = np.array([std[0, a] for _, a in pairs])
    if np.mean(spread < th.batchnorm_output_std) <= 0.5:
        return None
    return [run.layers[c].name for c, _ in pairs], float(np.median(spread))


def _as_initialised(run: RunSeries, norm: float, c: int) -> bool:
    """Weight 1 and bias 0 in each of C channels: a norm of sqrt(C), C = half the parameters."""
    channels = run.layers[c].n_params / 2
    return bool(np.isfinite(norm) and channels >= 1 and abs(norm - np.sqrt(channels)) <= 1e-3 * np.sqrt(channels))


def eval_mode_first(evidence: dict, causes: list[str], remedies: list[Remedy]) -> tuple[list[str], list[Remedy]]:
    """BatchNorm that did not normalise at the first step: the model is in eval mode, and that comes
    first; the other causes stand behind it."""
    names = evidence["eval_mode_batchnorm"]
    cause = (f"eval mode: the BatchNorm layers ({listed(names, quote=False)}) did not normalise at the first step "
             f"(the activations after them spread {evidence['act_std_after_batchnorm']:.2g}, where a standardised "
             "input gives ~0.6): in eval mode (model.eval()) BatchNorm applies its running statistics, mean 0 and "
             "variance 1 at the start, and normalises nothing (or, in training mode, pre-activations far below its eps, "
             "std < 3e-3, which it cannot standardise)")
    fix = Remedy("Train in training mode: call model.train() before the training loop (and after each evaluation)",
                 "model.train()  # before the training loop, and again after every model.eval()")
    return [cause, *causes], [fix, *remedies]
