"""A script whose lr comes from its command line (`lr=args.lr`, run as `fix -- python s.py --lr 0.5`):
the lr change also says the option to pass, which gives the optimizer the lr the pasted line does."""

import sys

import numpy as np
import pytest
import torch

from gradwatch.diagnose.advice import Context
from gradwatch.fix.candidates import lr_scale
from gradwatch.fix.names import read_names
from gradwatch.store.series import RunSeries

SCRIPT = '''
import argparse
import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--learning-rate", "-l", type=float, default=0.1)
args = parser.parse_args()
net = nn.Linear(4, 1)
opt = torch.optim.SGD(net.parameters(), momentum=0.9, lr=args.learning_rate)
# BUILT
'''


def _context(lr: float) -> Context:
    return Context(RunSeries([], np.arange(3), np.ones(3), np.full(3, lr), {}, meta={"optimizer": "SGD"}))


def _opt(source: str, argv: list[str], monkeypatch) -> torch.optim.Optimizer:
    monkeypatch.setattr(sys, "argv", ["s.py", *argv])
    ns: dict = {"__name__": "__main__"}
    exec(source, ns)
    return ns["opt"]


def test_the_lr_option_is_named_and_gives_what_the_pasted_line_gives(monkeypatch):
    names = read_names(SCRIPT, _context(0.5))
    assert names.lr_option == "--learning-rate"
    code = names.complete(lr_scale(0.1, names).code)
    assert code.endswith("run it with --learning-rate 0.05")
    pasted = _opt(SCRIPT.replace("# BUILT", code), ["--learning-rate", "0.5"], monkeypatch)
    passed = _opt(SCRIPT, ["--learning-rate", code.rsplit(" ", 1)[-1]], monkeypatch)
    assert passed.param_groups[0]["lr"] == pasted.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("lr", ["args.learning_rate * 2", "0.5", "config.lr"])
def test_an_lr_not_read_straight_from_an_option_names_none(lr):
    names = read_names(SCRIPT.replace("lr=args.learning_rate", f"lr={lr}"), _context(0.5))
    assert names.lr_option == "" and "run it with" not in lr_scale(0.1, names).code


RESUMED = '''
import argparse, os
import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=1.5)
args = parser.parse_args()
net = nn.Linear(4, 1)
opt = torch.optim.SGD(net.parameters(), lr=args.lr)
if os.path.exists(CKPT):
    opt.load_state_dict(torch.load(CKPT))
# BUILT
torch.save(opt.state_dict(), CKPT)
'''


def test_no_option_is_offered_where_the_optimizers_state_is_loaded(monkeypatch, tmp_path):
    """On resume load_state_dict puts the saved lr back: `--lr 0.15` ran at 1.5. The pasted line,
    placed after the load, does set the lr the trial ran at."""
    script = RESUMED.replace("CKPT", repr(str(tmp_path / "last.pt")))
    names = read_names(script, _context(1.5))
    code = names.complete(lr_scale(0.1, names).code)
    assert names.lr_option == "--lr" and "run it with" not in code
    _opt(script, [], monkeypatch)  # the first run leaves its checkpoint
    assert _opt(script, ["--lr", "0.15"], monkeypatch).param_groups[0]["lr"] == 1.5  # why: the option is undone
    pasted = _opt(script.replace("# BUILT", code), [], monkeypatch)
    assert pasted.param_groups[0]["lr"] == pytest.approx(0.15)
