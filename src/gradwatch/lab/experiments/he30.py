"""He et al. (2015): a 30-layer ReLU MLP with plain SGD, Xavier vs He initialisation."""

from __future__ import annotations

from pathlib import Path

import torch

from gradwatch.lab import components, data, nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.plots import losses_and_profile
from gradwatch.lab.train import per_layer, train

MARGIN = 0.8  # He's final loss must be below this fraction of Xavier's


def run(quick: bool, out: Path, progress: Progress) -> Result:
    # full: lr 0.02, because at 0.05 plain SGD on the 128-wide He net spikes mid-training (gradient
    # norm 60x its median near step 900) and the Xavier net leaves its plateau after ~1000 steps
    width, steps, lr = (64, 300, 0.05) if quick else (128, 2000, 0.02)
    task = data.digits()
    res = Result(["init", "final loss", "test accuracy", "grad norm fc1 / fc30 at init", "diagnosed"], [])
    res.notes.append(f"30 hidden ReLU layers of {width}, zero biases, SGD lr {lr}, batch 64, {steps} steps on digits")
    progress.phase("training Xavier and He", 2 * steps)
    runs, ratios, kinds = [], {}, {}
    profiles = {}
    for init, label in (("xavier_normal", "Xavier"), ("he", "He")):
        torch.manual_seed(0)
        r = train(nets.mlp(64, width, 30, 10, "relu", init), task, steps=steps, lr=lr, seed=0,
                  label=label, progress=progress)
        names, g = per_layer(r.series, "grad_norm", 0)
        profiles[label] = g
        ratios[label] = float(g[0] / g[-2])
        kinds[label] = components.finding_kinds(r.series)
        runs.append(r)
        res.rows.append([label, r.final_loss(), r.test, ratios[label], components.kinds_text(kinds[label])])
    xavier, he = runs
    res.check(f"He learns where Xavier stalls: He's final loss < {MARGIN} × Xavier's",
              he.final_loss() < MARGIN * xavier.final_loss(), he=he.final_loss(), xavier=xavier.final_loss())
    res.check("Xavier's gradients vanish toward the input at init (fc1 / fc30 < 1e-2); He's stay level (> 0.1)",
              ratios["Xavier"] < 1e-2 and ratios["He"] > 0.1, xavier=ratios["Xavier"], he=ratios["He"])
    res.check("gradwatch.diagnose finds vanishing_gradient in the Xavier run and not in the He run",
              "vanishing_gradient" in kinds["Xavier"] and "vanishing_gradient" not in kinds["He"],
              xavier=components.kinds_text(kinds["Xavier"]), he=components.kinds_text(kinds["He"]))
    res.figures.append(losses_and_profile(out, "he30", runs, names, profiles, "‖∂L/∂W‖ at step 0",
                                          "per-layer gradient norm at initialisation"))
    return res


EXPERIMENT = Experiment(
    name="he30",
    title="30-layer ReLU net: Xavier vs He initialisation (He et al. 2015)",
    claim="With ReLU, Xavier's variance 1/n halves the signal at every layer, so a 30-layer net's "
          "gradients vanish and it stalls; He's 2/n keeps them level and it learns.",
    expected="He's final training loss well below Xavier's (< 0.8×); Xavier's first-layer gradient "
             "< 1e-2 of the last hidden layer's at init.",
    source="He, Zhang, Ren, Sun 2015, Delving Deep into Rectifiers (Fig. 3)",
    run=run,
)
