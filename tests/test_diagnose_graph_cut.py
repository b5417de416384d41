"""Layers that run in the forward pass but never get a gradient (a stray `.detach()` above them):
no update ratio can show it, since with no gradient nothing is recorded for them at all."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from series_builder import build, kinds


def _cut(run, layers=("fc0", "fc1")):
    """No gradient recorded for `layers` at any step: the collector saw none arrive."""
    for name in layers:
        c = run.column(name)
        for metric in ("grad_norm", "grad_max", "weight_norm", "update_ratio", "grad_out_rms"):
            run.metrics[metric][:, c] = np.nan
    return run


def test_the_lowest_layers_getting_no_gradient_are_a_stalled_error():
    found = diagnose(_cut(build()))
    f = next(f for f in found if f.kind == "stalled_layers")
    assert f.severity == "warning" and f.layers == ("fc0", "fc1") and f.first_step == 0
    assert f.evidence["first_layer_with_gradient"] == "fc2" and f.evidence["steps_without_gradient"] == 100
    assert f.causes[0].startswith("graph cut:") and "below 'fc1'" in f.causes[0] and "'fc2'" in f.remedies[0].action
    assert "model.fc0" in f.remedies[1].code and "requires_grad_(False)" in f.remedies[1].code


def test_only_the_input_side_counts_and_frozen_or_short_runs_are_not_cut():
    # a layer in the middle without gradient (an expert given no token, a side branch) is no cut
    assert "stalled_layers" not in kinds(diagnose(_cut(build(), ("fc2",))))
    # layers no optimizer holds are the other warning's (a backbone frozen with requires_grad left on)
    run = _cut(build())
    run.meta["outside_optimizers"] = ["fc0", "fc1"]
    assert not [f for f in diagnose(run) if f.evidence.get("no_gradient")]
    # nothing got a gradient (a NaN at step 0 in every layer): nothing to compare with
    assert diagnose(_cut(build(), [f"fc{i}" for i in range(5)])) == []
    # fewer recorded steps than `zero_gradient_steps`: too early to tell
    assert "stalled_layers" not in kinds(diagnose(_cut(build(n_steps=9))))
    # a gradient that overflowed (inf: a GradScaler's skipped steps) arrived: no cut
    run = _cut(build())
    run.metrics["grad_norm"][:, run.column("fc0")] = np.inf
    run.metrics["grad_norm"][:, run.column("fc1")] = np.inf
    assert not [f for f in diagnose(run) if f.evidence.get("no_gradient")]
    # one gradient in the whole run is a gradient: the graph is not cut
    run = _cut(build())
    run.metrics["grad_norm"][50, run.column("fc0")] = 0.5
    assert not [f for f in diagnose(run) if f.evidence.get("no_gradient")]


class _Detached(nn.Module):
    def __init__(self, cut: bool):
        super().__init__()
        self.cut = cut
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc3(h.detach() if self.cut else h)


def _train(cut: bool, freeze: bool = False):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = _Detached(cut)
    if freeze:  # frozen on purpose before watching: no layer is made of them
        model.fc1.requires_grad_(False), model.fc2.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    watch = gw.watch(model, opt, warn=False)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    found = watch.findings()
    watch.detach()
    return model, found


def test_a_stray_detach_is_found_in_a_real_run_and_a_deliberate_freeze_is_not():
    model, found = _train(cut=True)
    assert all(p.grad is None for p in (*model.fc1.parameters(), *model.fc2.parameters()))  # torch agrees
    f = next(f for f in found if f.kind == "stalled_layers")
    assert f.layers == ("fc1", "fc2") and f.severity == "warning" and f.evidence["first_layer_with_gradient"] == "fc3"
    assert [f for f in _train(cut=False)[1] if f.severity != "info"] == []
    assert [f for f in _train(cut=True, freeze=True)[1] if f.severity != "info"] == []


def test_a_reentrant_checkpoint_on_an_input_needing_no_grad_is_a_cut_and_the_other_kind_is_not():
    """torch.utils.checkpoint(use_reentrant=True) passes no gradient to a block whose inputs need
    none (torch only warns "Gradients will be None"); use_reentrant=False does."""
    from torch.utils.checkpoint import checkpoint

    def run(reentrant: bool):
        torch.manual_seed(0)
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        model = nn.ModuleDict({"blocks": blocks, "head": nn.Linear(8, 3)})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gw.watch(model, opt, warn=False) as watch:
            for _ in range(12):
                h = x
                for b in blocks:
                    h = checkpoint(b, h, use_reentrant=reentrant)
                loss = nn.functional.cross_entropy(model["head"](h), y)
                opt.zero_grad(), loss.backward(), opt.step()
            found = watch.findings()
        return blocks, found

    blocks, found = run(True)
    assert blocks[0][0].weight.grad is None  # torch agrees: no gradient reached them
    f = next(f for f in found if f.kind == "stalled_layers")
    assert f.layers == ("blocks.0.0", "blocks.1.0") and "use_reentrant=True" in f.causes[0]
    blocks, found = run(False)
    assert blocks[0][0].weight.grad is not None and not [f for f in found if f.evidence.get("no_gradient")]


def test_a_gan_watched_with_the_discriminators_optimizer_is_no_graph_cut():
    """D's step runs G under fake.detach() by design; G's gradient comes in its own backward, which
    a watch of D's optimizer does not see: G's layers record no gradient, as a cut's would."""
    torch.manual_seed(0)
    gan = nn.ModuleDict({"G": nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
                         "D": nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))})
    opt_g, opt_d = torch.optim.Adam(gan["G"].parameters(), 1e-3), torch.optim.Adam(gan["D"].parameters(), 1e-3)
    bce = nn.BCEWithLogitsLoss()
    watch = gw.watch(gan, opt_d, warn=False)
    for _ in range(40):
        fake = gan["G"](torch.randn(32, 4))
        loss_d = bce(gan["D"](torch.randn(32, 2) + 2), torch.ones(32, 1)) + bce(gan["D"](fake.detach()), torch.zeros(32, 1))
        opt_d.zero_grad(), loss_d.backward(), opt_d.step()
        opt_g.zero_grad(), bce(gan["D"](fake), torch.ones(32, 1)).backward(), opt_g.step()
    run, found = watch.series(), watch.findings()
    watch.detach()
    assert np.isnan(run.metrics["grad_norm"][:, run.column("G.0")]).all()  # what a cut looks like, recorded
    assert all(p.grad is not None for p in gan["G"].parameters())  # but G did get its gradient
    assert "stalled_layers" not in [f.kind for f in found]
