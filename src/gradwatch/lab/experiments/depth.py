"""Glorot & Bengio (2010): activation × initialisation in a 5-hidden-layer net, back-propagated
gradients layer by layer at initialisation and after training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradwatch.lab import data, nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.page import figure, save
from gradwatch.lab.plots import layer_profile
from gradwatch.lab.train import per_layer, train

ACTS = ("sigmoid", "tanh", "softsign", "relu")
INITS = ("standard", "xavier")  # Glorot's "standard" U[±1/sqrt(n)] and "normalized" U[±sqrt(6/(n_in+n_out))]
LEVEL_FACTOR = 2.0  # normalized init must keep the layers at least this much more level
# Glorot & Bengio's Fig. 2: sigmoid, standard init. The lr of the grid (0.1) barely moves a sigmoid net
# in 300 steps (top layer's mean 0.505 -> 0.492); at 1.0 the drift the paper shows happens within the
# run. A sigmoid layer whose mean output falls below TOP_SATURATED (from 0.5 at init) is pushed
# toward its 0 asymptote; the lower layers count as unmoved while their means stay above LOWER_KEPT.
SATURATION_LR, TOP_SATURATED, LOWER_KEPT = 1.0, 0.2, 0.4


def level(profile: np.ndarray) -> float:
    """min/max of the per-layer gradient scale over the hidden layers: 1 = perfectly level."""
    return float(np.nanmin(profile) / np.nanmax(profile))


def shrinks_toward_input(profile: np.ndarray) -> bool:
    """Whether a per-layer profile (input → output) falls strictly at every layer toward the input: the
    direction of Glorot & Bengio's Fig. 7, which min/max alone does not tell (a profile growing
    toward the input, as in the chaotic phase, has a small min/max too)."""
    return bool(np.all(np.diff(profile) > 0))


def mean_activations(series) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The activation layers' names, the sampled steps and their mean outputs (rows: sampled steps)."""
    cols = sorted((i for i, l in enumerate(series.layers) if l.role == "activation"),
                  key=lambda i: series.layers[i].index)
    values = series.metrics["act_mean"][:, cols]
    kept = ~np.all(np.isnan(values), axis=1)
    return [series.layers[i].name for i in cols], np.asarray(series.steps)[kept], values[kept]


def top_layer_saturation(res: Result, width: int, steps: int, task, out: Path, progress: Progress) -> Path:
    """Glorot & Bengio 2010, Fig. 2: in a sigmoid net with standard init the top hidden layer is driven
    to saturation at 0 early in training while the lower layers stay near 0.5 (the paper's explanation:
    the softmax layer first learns from its biases and silences the still uninformative top layer)."""
    torch.manual_seed(0)
    r = train(nets.mlp(64, width, 5, 10, "sigmoid", "standard"), task, steps=steps, lr=SATURATION_LR, seed=0,
              label=f"sigmoid/standard, lr {SATURATION_LR:g}", progress=progress)
    names, at, means = mean_activations(r.series)
    low = int(np.argmin(means[:, -1]))
    top, lower = float(means[low, -1]), float(means[low, :-1].min())
    res.check(f"sigmoid, standard init (lr {SATURATION_LR:g}): the top hidden layer is driven toward saturation at 0 "
              f"(its mean output falls from {means[0, -1]:.2f} below {TOP_SATURATED:g}) while every lower hidden layer "
              f"stays near 0.5 (mean > {LOWER_KEPT:g}), as in Glorot & Bengio's Fig. 2",
              top < TOP_SATURATED and lower > LOWER_KEPT, top_mean_lowest=top, at_step=int(at[low]),
              top_mean_at_init=float(means[0, -1]), lower_layers_least_mean=lower, final_loss=r.final_loss())
    res.rows.append(["sigmoid", f"standard, lr {SATURATION_LR:g}", r.final_loss(), r.test, "–", "–", "–"])
    fig, (ax,) = figure(size=(6.0, 3.6))
    for j, name in enumerate(names):
        ax.plot(at, means[:, j], label=f"{name} (hidden layer {j + 1}{', top' if j == len(names) - 1 else ''})")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("mean sigmoid output (batch, units)")
    ax.set_title(f"sigmoid, standard init, lr {SATURATION_LR:g}: mean activation per layer (G&B Fig. 2)", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, out, "sigmoid_saturation")


def run(quick: bool, out: Path, progress: Progress) -> Result:
    width, steps = (64, 300) if quick else (256, 2000)
    task = data.digits()
    res = Result(["activation", "init", "final loss", "test accuracy", "level at init", "level after",
                  "forward level at init"], [])
    res.notes += [f"5 hidden layers of {width}, SGD lr 0.1, batch 64, {steps} steps on digits (1300 train / 497 test)",
                  "level = min/max over the 5 hidden layers of RMS ∂L/∂s (gradient w.r.t. the pre-activation, "
                  "gradwatch's grad_out_rms of each Linear), at step 0 and at the last sampled step",
                  "forward level = the same min/max for the standard deviation of each hidden layer's activations "
                  "at step 0 (gradwatch's act_std; Glorot & Bengio's Fig. 6, their Fig. 7 is ∂L/∂s)"]
    res.notes.append(f"Fig. 2 run: sigmoid, standard init, lr {SATURATION_LR:g} (the grid's 0.1 barely moves a sigmoid "
                     f"net in {steps} steps), same width and steps; the mean output of each sigmoid layer, every 10 steps")
    progress.phase("training 8 nets", steps * len(ACTS) * len(INITS))
    profiles, results, forward = {}, {}, {}
    for a in ACTS:
        for init in INITS:
            torch.manual_seed(0)
            run_ = train(nets.mlp(64, width, 5, 10, a, init), task, steps=steps, lr=0.1, seed=0,
                         label=f"{a}/{init}", progress=progress)
            names, at_init = per_layer(run_.series, "grad_out_rms", 0)
            _, after = per_layer(run_.series, "grad_out_rms", -1)
            names, at_init, after = names[:-1], at_init[:-1], after[:-1]  # hidden layers only
            act_names, forward[a, init] = per_layer(run_.series, "act_std", 0, role="activation", types=())
            profiles[a, init] = (at_init, after)
            results[a, init] = run_
            res.rows.append([a, "normalized" if init == "xavier" else init, run_.final_loss(), run_.test,
                             level(at_init), level(after), level(forward[a, init])])
    acc = {k: r.test for k, r in results.items()}
    best_sigmoid = max(acc["sigmoid", i] for i in INITS)
    worst_other = min(v for (a, _), v in acc.items() if a != "sigmoid")
    res.check("sigmoid is worst: its best test accuracy is below every other activation's",
              best_sigmoid < worst_other, best_sigmoid=best_sigmoid, worst_other=worst_other)
    for a in ("tanh", "softsign", "relu"):
        std, norm = level(profiles[a, "standard"][0]), level(profiles[a, "xavier"][0])
        falls = shrinks_toward_input(profiles[a, "standard"][0])
        res.check(f"{a}: with standard init ∂L/∂s shrinks at every layer toward the input; normalized init keeps it "
                  f"more level across layers at init (level ≥ {LEVEL_FACTOR:g}× standard's)",
                  falls and norm >= LEVEL_FACTOR * std, normalized=norm, standard=std,
                  standard_shrinks_toward_input="yes" if falls else "no")
    fwd = {(a, i): level(forward[a, i]) for a in ("tanh", "softsign", "relu") for i in INITS}
    res.check(f"forward: with standard init the activations' spread shrinks layer after layer, normalized init keeps "
              f"it more level (forward level ≥ {LEVEL_FACTOR:g}× standard's for tanh, softsign and ReLU)",
              all(fwd[a, "xavier"] >= LEVEL_FACTOR * fwd[a, "standard"] for a in ("tanh", "softsign", "relu")),
              **{f"{a} {'normalized' if i == 'xavier' else i}": v for (a, i), v in fwd.items()})
    fig, axes = figure(4, 3, size=(3.6, 3.2))
    for col, a in enumerate(ACTS):
        for row, when in enumerate(("at initialisation", "after training")):
            layer_profile(axes[row * 4 + col], names,
                          {("normalized" if i == "xavier" else i): profiles[a, i][row] for i in INITS},
                          "RMS ∂L/∂s", f"{a}: ∂L/∂s {when}")
        layer_profile(axes[8 + col], act_names, {("normalized" if i == "xavier" else i): forward[a, i] for i in INITS},
                      "std of the activations", f"{a}: activations at initialisation")
    res.figures.append(save(fig, out, "backprop_gradients"))
    progress.phase("sigmoid saturation (Fig. 2)", steps)
    res.figures.append(top_layer_saturation(res, width, steps, task, out, progress))
    return res


EXPERIMENT = Experiment(
    name="depth",
    title="activation × initialisation at depth 5 (Glorot & Bengio 2010)",
    claim="Sigmoid networks train worst, their top hidden layer driven to saturation at 0 early in training; "
          "the normalized (Xavier) initialisation keeps back-propagated gradients level across layers, where "
          "the standard U[±1/√n] lets them shrink toward the input, and keeps the activations' spread level, "
          "where the standard one lets it shrink layer after layer.",
    expected="sigmoid has the lowest test accuracy, and (standard init) its top hidden layer's mean output falls "
             "from 0.5 below 0.2 while the lower layers stay above 0.4; for tanh, softsign and ReLU, with standard "
             "init ∂L/∂s falls at every layer toward the input, and the per-layer gradient level at "
             "initialisation, and the activations' forward level, are at least 2× closer to 1 with normalized init.",
    source="Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks "
           "(Fig. 2, 6, 7)",
    run=run,
)
