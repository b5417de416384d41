"""Plain vs residual deep MLPs (He et al. 2016); plain+BN is the negative control for vanishing."""

from __future__ import annotations

from pathlib import Path

import torch

from gradwatch.lab import components, data, nets
from gradwatch.lab.base import Experiment, Progress, Result
from gradwatch.lab.plots import losses_and_profile
from gradwatch.lab.train import per_layer, train

# (label, init, bn, residual). Plain without BN keeps torch's default init: the common failing case.
KINDS = (("plain", "torch", False, False), ("plain+BN", "he", True, False), ("residual+BN", "he", True, True))
LR = 0.02


def run(quick: bool, out: Path, progress: Progress) -> Result:
    depths, width, steps = ((21, 51), 32, 200) if quick else ((21, 51), 64, 2000)
    task = data.digits()
    res = Result(["net", "depth", "final loss", "test accuracy", "RMS ∂L/∂s fc1 / last hidden at init", "diagnosed"], [])
    res.notes += [f"ReLU MLPs of width {width} at depths {depths} (one input layer + blocks of two for the "
                  f"residual net, so depths are odd), SGD lr {LR}, batch 64, {steps} steps on digits",
                  "diagnosed: the finding kinds gradwatch.diagnose reports for the run",
                  "confound: He et al. 2016 verified that their plain BN nets have healthy gradient norms; this "
                  "fully connected plain+BN net does not: its ∂L/∂s grows toward the input at init (batch norm's "
                  "gradient explosion in deep plain nets, Yang et al. 2019), so the degradation shown here is "
                  "not separated from that explosion as it is in the paper"]
    progress.phase("training 6 nets", steps * len(KINDS) * len(depths))
    runs, kinds, final, growth = [], {}, {}, {}
    names, profiles = None, {}
    for depth in depths:
        for label, init, bn, residual in KINDS:
            torch.manual_seed(0)
            model = nets.mlp(64, width, depth, 10, "relu", init, bn=bn, residual=residual)
            r = train(model, task, steps=steps, lr=LR, seed=0, label=f"{label} {depth}", progress=progress)
            layer_names, g = per_layer(r.series, "grad_out_rms", 0)
            k = components.finding_kinds(r.series)
            kinds[label, depth], final[label, depth] = k, r.final_loss()
            growth[label, depth] = float(g[0] / g[-2])  # > 1: ∂L/∂s grows toward the input
            runs.append(r)
            if depth == depths[-1] and not residual:
                names, profiles[label] = layer_names, g
            res.rows.append([label, depth, r.final_loss(), r.test, growth[label, depth],
                             components.kinds_text(k)])
    deep = depths[-1]
    for depth in depths:
        res.check(f"depth {depth}: the residual net trains to < 0.5 × the plain+BN net's final loss",
                  final["residual+BN", depth] < 0.5 * final["plain+BN", depth],
                  residual=final["residual+BN", depth], plain_bn=final["plain+BN", depth])
    res.check(f"degradation: plain+BN at depth {deep} ends with a higher training loss than at depth {depths[0]}",
              final["plain+BN", deep] > final["plain+BN", depths[0]], deep=final["plain+BN", deep],
              shallow=final["plain+BN", depths[0]])
    res.check(f"the confound, measured: plain+BN's RMS ∂L/∂s at fc1 is > 10× the last hidden layer's at init "
              f"at depth {deep} (it explodes toward the input; the paper's plain nets did not)",
              growth["plain+BN", deep] > 10, fc1_over_last=growth["plain+BN", deep])
    res.check("negative control: plain+BN is NOT diagnosed vanishing_gradient at either depth; the plain net "
              "without BN is, at both", all("vanishing_gradient" not in kinds["plain+BN", d] and
                                             "vanishing_gradient" in kinds["plain", d] for d in depths),
              **{f"plain+BN {d}": components.kinds_text(kinds["plain+BN", d]) for d in depths})
    res.figures.append(losses_and_profile(out, "residual", runs, names, profiles, "RMS ∂L/∂s at step 0",
                                          f"plain nets at depth {deep}: back-propagated gradient at init"))
    return res


EXPERIMENT = Experiment(
    name="residual",
    title="plain vs residual deep MLPs (He et al. 2016)",
    claim="Residual connections let very deep nets train; a deep plain net with batch norm trains worse "
          "than a shallower one (degradation) although its gradients do not vanish. Unlike the paper's plain "
          "nets, this MLP's plain+BN net's gradients explode toward the input at init, a confound.",
    expected="residual+BN < 0.5× plain+BN's final loss at depth 21 and 51; plain+BN worse at 51 than at 21; "
             "gradwatch.diagnose finds no vanishing_gradient in plain+BN (it does in plain without BN); plain+BN's "
             "∂L/∂s at fc1 > 10× its last hidden layer's at depth 51 (the confound).",
    source="He, Zhang, Ren, Sun 2016, Deep Residual Learning (Sec. 4.1: plain nets with BN, healthy gradients); "
           "Yang et al. 2019, A Mean Field Theory of Batch Normalization",
    run=run,
)
