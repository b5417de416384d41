"""The watch's live outputs: a status line on stderr, TensorBoard scalars at each flush."""

import pytest
import torch
from torch import nn

import gradwatch as gw


def _train(steps=12, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, flush_every=5, warn=False, **kw):
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()


def test_status_line_on_stderr_only(capsys):
    _train(status=True)
    out, err = capsys.readouterr()
    assert out == "" and "step 9" in err and "loss" in err


def test_no_status_line_when_stderr_is_not_a_terminal(capsys):
    _train()
    assert capsys.readouterr().err == ""


def test_tensorboard_dir_gets_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tensorboard_dir=tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags and any(t.startswith("grad_norm/") for t in tags)
    assert len(acc.Scalars("loss")) == 12
