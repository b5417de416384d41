"""A parameter that is a single number with no shape (a learnt temperature or logit scale,
`nn.Parameter(torch.tensor(1.0))`): the watch must record it, not crash the training."""

import numpy as np
import torch
from torch import nn

import gradwatch


class Temperature(nn.Module):
    """A classifier whose logits are divided by a learnt temperature, exp(log_t), a 0-dim parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.log_t = nn.Parameter(torch.zeros(()))
        self.bias_scale = nn.Parameter(torch.ones(()))  # two 0-dim parameters: one group of equal shapes

    def forward(self, x):
        return self.fc(x) * self.bias_scale / self.log_t.exp()


def _train(steps: int, watched: bool, optimizer=torch.optim.Adam):
    torch.manual_seed(0)
    model = Temperature()
    opt = optimizer(model.parameters(), lr=0.05)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(steps)]
    grads = []
    watch = gradwatch.watch(model, opt, warn=False, sample_every=2) if watched else None
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append(float(model.log_t.grad.abs()))
        opt.step()
    series = watch.series() if watch else None
    if watch:
        watch.close()
    return model, grads, series


def test_a_zero_dim_parameter_is_watched_and_training_unchanged():
    plain, _, _ = _train(6, watched=False)
    watched, grads, series = _train(6, watched=True)
    assert torch.equal(plain.log_t, watched.log_t) and torch.equal(plain.fc.weight, watched.fc.weight)
    assert {"log_t", "bias_scale"} <= set(series.layer_names())  # each its own layer
    recorded = series.metrics["grad_norm"][:, series.column("log_t")]
    np.testing.assert_allclose(recorded, np.asarray(grads)[series.steps], rtol=1e-6)  # |g| of a single number
