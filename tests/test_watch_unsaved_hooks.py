"""`torch.save(model)` pickles a module with its hooks. A watch's hooks were closures: a script that
saved its whole model after a step whose next one was sampled (its hooks armed) crashed with
"Can't pickle local object". Pickled or deep-copied, a watch's hook is now a no-op."""

import copy
import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_a_model_saved_whole_while_watched_loads_and_runs_as_it_was():
    model, x = _model(), torch.randn(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, sample_every=2, warn=False):
        for _ in range(2):  # the next step (2) is sampled: its hooks are armed now
            opt.zero_grad()
            F.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
        assert model[0]._forward_hooks  # (armed: what the pickle meets)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        assert b"gradwatch.collect" not in buffer.getvalue()  # (loads where gradwatch is not installed)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_deep_copy_made_on_a_sampled_step_is_not_read_as_the_watched_model():
    """An EMA or teacher copy made while the hooks are armed ran them, recording its own outputs
    as the watched layers'; a copy 100x larger shows in the recorded mean if it is counted."""
    model, x = _model(), torch.randn(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, sample_every=1, warn=False) as watch:
        opt.zero_grad()
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin[0].weight.mul_(100.0)
        out = model(x).sum() + twin(x).sum()
        out.backward()
        opt.step()
        run = watch.series()
    relu = torch.relu(model[0](x))
    assert np.isclose(run.metrics["act_mean"][0, run.column("1")], relu.mean().item(), rtol=1e-5)
