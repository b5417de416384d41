"""Param groups at different learning rates: a layer slowed by its own group's lr is judged per
unit of lr (discriminative fine-tuning), but only down to `discriminative_lr_floor`; below it the
layer barely moves whatever the reason, and is stalled."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import DEFAULT, diagnose
from series_builder import build, kinds, sampled


def _slowed(scale: float, slow=("fc0", "fc1")):
    """`slow` in a group at `scale` of the top lr, updating `scale` times as much as the rest."""
    run = build()
    run.meta["lr_scale"] = {f"fc{i}": (scale if f"fc{i}" in slow else 1.0) for i in range(5)}
    for name in slow:
        run.metrics["update_ratio"][sampled(run), run.column(name)] *= scale
    return run


def test_a_slowed_group_above_the_lowest_layer_is_stalled_too():
    """A two-tower recommender's item tower at lr 1e-7 beside the user tower's 1e-3 (a typo) had no
    finding: it ran after the user tower, and only the lowest layer was compared with those above."""
    floor = DEFAULT.discriminative_lr_floor
    f = next(f for f in diagnose(_slowed(floor / 10, ("fc2", "fc3"))) if f.kind == "stalled_layers")
    assert f.layers == ("fc2", "fc3") and f.evidence["lr_scale"] == {"fc2": floor / 10, "fc3": floor / 10}
    assert f.remedies[0].code.startswith("top = max(g['lr']")
    assert "stalled_layers" not in kinds(diagnose(_slowed(floor, ("fc2", "fc3"))))  # fine-tuning's range


def test_a_group_below_the_floor_is_stalled_and_said_to_be_its_lr():
    floor = DEFAULT.discriminative_lr_floor
    assert "stalled_layers" not in kinds(diagnose(_slowed(floor)))  # fine-tuning's range: per unit of lr
    f = next(f for f in diagnose(_slowed(floor / 2)) if f.kind == "stalled_layers")
    assert f.layers == ("fc0", "fc1") and f.evidence["lr_scale"] == {"fc0": floor / 2, "fc1": floor / 2}
    assert f.causes[0].startswith("learning rate:") and f"{floor / 2:.2g}" in f.causes[0]
    assert "0.01 * top" in f.remedies[0].code and "requires_grad_(False)" in f.remedies[1].code


def test_the_floor_is_a_threshold_a_caller_can_move():
    run = _slowed(DEFAULT.discriminative_lr_floor / 2)
    from dataclasses import replace
    assert "stalled_layers" not in kinds(diagnose(run, replace(DEFAULT, discriminative_lr_floor=1e-4)))


def test_a_fresh_backbone_in_a_group_at_lr_1e_6_beside_0_05_is_stalled():
    """The benchmark's st_lower_lr_tiny, small: SGD with momentum, lower layers at 2e-5 of the head's lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                          nn.ReLU(), nn.Linear(32, 4))
    low, high = [*model[0].parameters(), *model[2].parameters()], [*model[4].parameters(), *model[6].parameters()]
    opt = torch.optim.SGD([{"params": low, "lr": 1e-6}, {"params": high, "lr": 0.05}], momentum=0.9)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(41):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        run = w.series()
    u = {n: run.series(n, "update_ratio")[1][-1] for n in ("0", "6")}
    assert u["0"] < 1e-3 * u["6"]  # measured: the lower layers barely move
    assert np.isclose(run.meta["lr_scale"]["0"], 2e-5)
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert f.layers[0] == "0" and "lr_scale" in f.evidence
