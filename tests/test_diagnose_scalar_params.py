"""A single learnt number (a temperature, a CLIP logit scale, a ReZero gate) is no weight layer of
the depth profile: it has no fan-in, and a model's own bare parameter runs first, as the lowest."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from gradwatch.store.series import LayerInfo, RunSeries
from series_builder import build, kinds, sampled


def _with_scalar(run: RunSeries, update_ratio: float) -> RunSeries:
    """`run` with a model's bare scalar parameter `t` in front of its layers (forward index -1)."""
    layers = [LayerInfo("t", "Clip", -1, "param", 1), *run.layers]
    metrics = {m: np.concatenate([np.full((len(run.steps), 1), np.nan), v], axis=1) for m, v in run.metrics.items()}
    rows = sampled(run)
    metrics["grad_norm"][:, 0] = 0.05
    metrics["weight_norm"][rows, 0] = 4.4
    metrics["update_ratio"][rows, 0] = update_ratio
    return RunSeries(layers, run.steps, run.loss, run.lr, metrics, meta=run.meta)


def test_a_logit_scale_at_a_higher_lr_is_not_a_stalled_layer():
    """A CLIP-style exp(t) at lr 0.2 beside towers at 1e-3 (Adam): per unit of lr it moved 3.6e-3 as
    much as the towers, and as the lowest 'layer' it was called stalled, with normalisation advised."""
    run = build(optimizer="Adam", lr=0.2)
    run.meta["lr_scale"] = {"t": 1.0, **{f"fc{k}": 0.005 for k in range(5)}}
    run = _with_scalar(run, update_ratio=1e-3)
    assert "stalled_layers" not in kinds(diagnose(run))


class _Scaled(nn.Module):
    """An MLP's normalised output times a learnt logit scale exp(t), a bare parameter of the model."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.t = nn.Parameter(torch.full((1,), 2.66))

    def forward(self, x):
        return self.t.exp() * nn.functional.normalize(self.body(x), dim=1)


def test_a_learnt_logit_scale_at_its_own_lr_trains_without_findings():
    torch.manual_seed(0)
    model = _Scaled()
    opt = torch.optim.Adam([{"params": model.body.parameters(), "lr": 1e-3}, {"params": [model.t], "lr": 0.2}])
    x = torch.randn(512, 16)
    y = x[:, :4].argmax(1)
    with gw.watch(model, opt, warn=False) as watch:
        for i in range(150):
            xb, yb = x[i % 8 * 64:(i % 8 + 1) * 64], y[i % 8 * 64:(i % 8 + 1) * 64]
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(), loss.backward(), opt.step()
        found = watch.findings()
    assert not [f.line() for f in found if f.severity != "info"]


def test_a_chain_of_one_number_linear_layers_stays_in_the_profile():
    """The textbook demo: nn.Linear(1, 1, bias=False) with sigmoids between, 20 deep. Each layer holds
    one number, and all left the profile: a 3.7e-17 gradient ratio gave no finding. A bare parameter
    is recorded under its owner's class, so the weight layer's own class tells them apart."""
    from gradwatch.diagnose.signals import profile_columns
    layers = [LayerInfo("t", "Clip", -1, "param", 1), LayerInfo("0", "Linear", 0, "param", 1),
              LayerInfo("1", "Conv2d", 1, "param", 1), LayerInfo("2", "NonDynamicallyQuantizableLinear", 2, "param", 1),
              LayerInfo("blk.alpha", "ConvNet", 3, "param", 1), LayerInfo("3", "Bilinear", 4, "param", 1)]
    run = RunSeries(layers, np.arange(3), np.ones(3), np.ones(3), {}, meta={})
    assert [run.layers[c].name for c in profile_columns(run)] == ["0", "1", "2", "3"]
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(1, 1, bias=False), nn.Sigmoid())][:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 1)
    with gw.watch(model, opt, warn=False) as watch:
        for _ in range(60):
            loss = nn.functional.mse_loss(model(x), 3 * x)
            opt.zero_grad(), loss.backward(), opt.step()
        found = watch.findings()
    assert "vanishing_gradient" in kinds(found)
