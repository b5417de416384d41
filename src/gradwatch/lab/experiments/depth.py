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


def level(profile: np.ndarray) -> float:
    """min/max of the per-layer gradient scale over the hidden layers: 1 = perfectly level."""
    return float(np.nanmin(profile) / np.nanmax(profile))


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
        res.check(f"{a}: normalized init keeps ∂L/∂s more level across layers at init "
                  f"(level ≥ {LEVEL_FACTOR:g}× standard's)", norm >= LEVEL_FACTOR * std, normalized=norm, standard=std)
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
    return res


EXPERIMENT = Experiment(
    name="depth",
    title="activation × initialisation at depth 5 (Glorot & Bengio 2010)",
    claim="Sigmoid networks train worst; the normalized (Xavier) initialisation keeps back-propagated "
          "gradients level across layers, where the standard U[±1/√n] lets them shrink toward the input, "
          "and keeps the activations' spread level, where the standard one lets it shrink layer after layer.",
    expected="sigmoid has the lowest test accuracy; for tanh, softsign and ReLU the per-layer gradient "
             "level at initialisation, and the activations' forward level, are at least 2× closer to 1 with "
             "normalized init.",
    source="Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks",
    run=run,
)
