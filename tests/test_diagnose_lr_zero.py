"""A learning rate of 0 on every step so far (a warm start, a frozen first phase): the flat loss is
said as info naming the lr, not a warning to raise the lr tenfold (ten times 0 is 0)."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from series_builder import build


def _flat(lr: float):
    run = build(n_steps=100, lr=lr)
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(0).random(100)
    run.metrics["update_ratio"][~np.isnan(run.metrics["update_ratio"])] = 0.0 if lr == 0 else 1e-3
    return run


def test_a_plateau_at_lr_zero_is_info_naming_the_lr():
    f = next(f for f in diagnose(_flat(0.0)) if f.kind == "loss_plateau")
    assert f.severity == "info" and f.causes == ("learning rate: 0 on every step",)
    assert "Raise" not in f.message and "learning rate 0 on every one" in f.message
    f = next(f for f in diagnose(_flat(0.1)) if f.kind == "loss_plateau")  # a real lr: the warning as before
    assert f.severity == "warning" and "Raise the learning rate" in f.message


def test_a_real_warm_start_at_lr_zero_is_no_warning_while_the_lr_is_zero():
    torch.manual_seed(0)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s < 100 else 1.0)
    watch = gw.watch(model, opt, warn=False)
    for i in range(50):
        b = slice(32 * (i % 8), 32 * (i % 8 + 1))
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        opt.zero_grad(), loss.backward(), opt.step(), sched.step()
    found = watch.findings()
    watch.detach()
    assert [f.severity for f in found if f.kind == "loss_plateau"] == ["info"]
    assert not [f for f in found if f.severity != "info"]


def test_a_first_group_at_lr_zero_beside_a_stepping_head_is_no_lr_zero_plateau():
    """`run.lr` is the first param group's: a backbone group listed first at lr 0 and a head at
    1e-4 read as 'the learning rate 0 on every one: no step moved the weights'. Real: 40 steps of a
    head-only lr, on a real watch, against the same run with every group at 0."""
    def run(head_lr: float):
        torch.manual_seed(0)
        x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
        body, head = nn.Sequential(nn.Linear(16, 32), nn.ReLU()), nn.Linear(32, 4)
        opt = torch.optim.SGD([{"params": body.parameters(), "lr": 0.0}, {"params": head.parameters(), "lr": head_lr}])
        model = nn.Sequential(body, head)
        with gw.watch(model, opt, warn=False) as watch:
            for i in range(60):
                b = slice(32 * (i % 8), 32 * (i % 8 + 1))
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
            return watch.series()

    stepping, still = run(1e-6), run(0.0)
    assert np.all(stepping.lr == 0) and stepping.meta.get("lr_scale")  # group 0's lr is what run.lr holds
    zero = [f for f in diagnose(stepping) if f.kind == "loss_plateau" and f.evidence.get("lr_zero")]
    assert zero == []
    assert any(f.evidence.get("lr_zero") for f in diagnose(still) if f.kind == "loss_plateau")
