"""A healthy baseline that the budget stopped is not the whole script: a pretraining that ran
within the budget said "Nothing to fix" of a script whose fine-tuning, after it, was broken."""

import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import print_result
from gradwatch.fix import fix


def _healthy(steps: int):
    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        w = torch.randn(4, 1)
        for _ in range(steps):
            x = torch.randn(32, 4)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x @ w).backward()
            opt.step()
    return train


def _text(tmp_path, steps: int, budget: int) -> str:
    result = fix(_healthy(steps), out=tmp_path, budget_steps=budget, progress=lambda msg: None)
    assert not result.trials and not result.screened
    console = Console(record=True, width=400)
    print_result(result, console)
    return console.export_text()


def test_nothing_to_fix_says_when_the_budget_stopped_the_script(tmp_path):
    text = _text(tmp_path / "cut", steps=80, budget=30)
    assert "Nothing to fix: 30 steps" in text
    assert "The budget stopped your script there: what it does after step 30" in text
    text = _text(tmp_path / "whole", steps=25, budget=30)  # the script ended on its own
    assert "Nothing to fix: 25 steps" in text and "The budget stopped" not in text
