"""A script that resumes its optimizer from a checkpoint: `opt.load_state_dict` puts back the lr it
saved, so an lr change pasted right after the optimizer is built is undone on resume. The change says
to make it after the state is loaded, where it holds."""

import numpy as np
import pytest
import torch

from gradwatch.diagnose.advice import Context
from gradwatch.fix.candidates import lr_scale
from gradwatch.fix.names import read_names
from gradwatch.store.series import RunSeries

SCRIPT = '''
import os
import torch
from torch import nn

net = nn.Linear(4, 1)
opt = torch.optim.SGD(net.parameters(), lr=1.5)
# BUILT
if os.path.exists("last.pt"):
    opt.load_state_dict(torch.load("last.pt"))
# LOADED
torch.save(opt.state_dict(), "last.pt")
'''


def _lr_after(source: str) -> float:
    ns: dict = {"__name__": "__main__"}
    exec(source, ns)
    return ns["opt"].param_groups[0]["lr"]


def test_an_lr_change_is_placed_after_the_optimizers_state_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Context(RunSeries([], np.arange(3), np.ones(3), np.full(3, 1.5), {}, meta={"optimizer": "SGD"}))
    names = read_names(SCRIPT, run)
    code = names.complete(lr_scale(0.1, names).code)
    assert "once, after opt is built and its state loaded" in code
    _lr_after(SCRIPT)  # a first run leaves its checkpoint, at lr 1.5
    assert _lr_after(SCRIPT.replace("# BUILT", code)) == 1.5  # resumed: the change was undone
    assert _lr_after(SCRIPT.replace("# LOADED", code)) == pytest.approx(0.15)  # where the comment says: it holds
    fresh = read_names(SCRIPT.replace('opt.load_state_dict(torch.load("last.pt"))', "pass"), run)
    assert "state loaded" not in lr_scale(0.1, fresh).code  # no state loaded: right after it is built
