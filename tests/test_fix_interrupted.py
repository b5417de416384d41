"""Ctrl-C during fix keeps what was measured: the baseline and the trials that finished are handed
back (`FixInterrupted.result`) and printed, not only the path of fix.json."""

import pytest
import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import print_interrupted
from gradwatch.fix import FixInterrupted, fix


def test_an_interrupted_fix_hands_back_and_prints_what_it_measured(tmp_path):
    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(0)
        layers = [m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())]
        model = nn.Sequential(*layers, nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(256, 16)
        y = x[:, :3].argmax(1)
        for step in range(40):
            if len(calls) == 3 and step == 2:
                raise KeyboardInterrupt  # Ctrl-C in the second remedy's trial
            i = torch.arange(step * 32, step * 32 + 32) % 256
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()

    with pytest.raises(FixInterrupted) as caught:
        fix(train, out=tmp_path, budget_steps=12, progress=lambda msg: None)
    result = caught.value.result
    assert "vanishing_gradient" in result.baseline.harmful and len(result.screened) == 1 and not result.trials
    console = Console(record=True, width=400)
    print_interrupted(result, console)
    text = console.export_text()
    first = result.screened[0]
    assert f"The baseline ({result.baseline.steps} steps) left {', '.join(result.baseline.harmful)}, loss" in text
    assert f"{first.candidate.name} (screened, {first.steps} steps)" in text
    if first.score < result.baseline.score:
        assert "is a lead, not a verdict" in text


def test_an_interrupt_before_the_baseline_is_measured_stays_a_plain_keyboard_interrupt(tmp_path):
    def train():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as caught:
        fix(train, out=tmp_path, budget_steps=12, progress=lambda msg: None)
    assert not isinstance(caught.value, FixInterrupted)
