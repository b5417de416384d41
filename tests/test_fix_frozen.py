"""Findings in layers no optimizer trains (a body frozen for fine-tuning) are said but not ranked:
no change to the training can touch them, so they must not make a remedy look worse or better,
nor call for a remedy of their own (a re-initialisation would wipe a pretrained body)."""

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import print_result
from gradwatch.diagnose.finding import Finding
from gradwatch.fix import BASELINE, FixResult, Trial, fix
from gradwatch.fix.candidates import Candidate
from gradwatch.fix.trial import untrained_layers
from gradwatch.store.series import LayerInfo, RunSeries


def _fine_tune(freeze: str):
    """A body whose ReLUs are mostly dead (biases at -5), frozen by `freeze`; Adam trains the head."""
    def train():
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        with torch.no_grad():
            body[0].bias[:20] = -5.0
            body[2].bias[:20] = -5.0
        head = nn.Linear(32, 3)
        model = nn.Sequential(body, head)
        if freeze == "requires_grad":
            body.requires_grad_(False)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        elif freeze == "lr 0":
            opt = torch.optim.Adam([{"params": body.parameters(), "lr": 0.0}, {"params": head.parameters()}], lr=1e-2)
        else:  # the body in no param group
            opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        x = torch.randn(512, 10)
        y = (x @ torch.randn(10, 3)).argmax(1)
        for step in range(60):
            i = torch.arange(step * 32, step * 32 + 32) % 512
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return train


@pytest.mark.parametrize("freeze", ["not in the optimizer", "requires_grad", "lr 0"])
def test_dead_units_of_a_frozen_body_call_for_no_remedy_and_are_said(tmp_path, freeze):
    """The frozen body's dead ReLUs were a harmful finding: fix screened 4-8 remedies (re-initialise,
    SELU + LeCun, ReLU -> LeakyReLU + He: each rewrites the frozen body) and printed the winner as
    the repair of a run whose trained head was healthy."""
    result = fix(_fine_tune(freeze), out=tmp_path, budget_steps=40, progress=lambda msg: None)
    base = result.baseline
    dead = [f for f in base.findings if f.kind == "dead_units"]
    assert dead and set(dead[0].layers) == {"0.1", "0.3"}  # found, in the body's ReLUs
    assert base.harmful == [] and not result.screened and not result.trials
    console = Console(record=True, width=400)
    print_result(result, console)
    text = console.export_text()
    assert "Not counted: dead_units in 0.1, 0.3" in text and "No optimizer trains those layers" in text


def _series(layers: list[LayerInfo], outside: list[str]) -> RunSeries:
    return RunSeries(layers, np.arange(3), np.ones(3), np.ones(3), {}, meta={"outside_optimizers": outside})


def test_untrained_layers_are_those_no_trained_weight_layer_runs_before():
    """An activation after a trained layer can be changed by training it, wherever a frozen layer is."""
    layers = [LayerInfo("a0", "ReLU", 0, "activation"), LayerInfo("w1", "Linear", 1, "param", 8),
              LayerInfo("a2", "ReLU", 2, "activation"), LayerInfo("w3", "Linear", 3, "param", 8),
              LayerInfo("a4", "ReLU", 4, "activation"), LayerInfo("w5", "Linear", 5, "param", 8),
              LayerInfo("a6", "ReLU", 6, "activation")]
    assert untrained_layers(_series(layers, ["w1", "w5"])) == {"a0", "w1", "a2", "w5"}
    assert untrained_layers(_series(layers, [])) == {"a0"}  # before any weight: the data's, not training's
    # nothing recorded is trained (every weight outside the optimizers): a fault of the script, kept
    assert untrained_layers(_series(layers, ["w1", "w3", "w5"])) == frozenset()


def test_findings_only_in_untrained_layers_do_not_rank_a_trial_behind():
    frozen = frozenset({"0.0", "0.1"})
    dead = Finding("dead_units", "warning", 0, ("0.1",), "m", {})
    baseline = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=1.0, first_loss=1.1, findings=[dead], untrained=frozen)
    swap = Trial(Candidate("a"), None, 0, 1.0, steps=40, final_loss=0.6, first_loss=1.1, untrained=frozen)
    lr = Trial(Candidate("b"), None, 0, 1.0, steps=40, final_loss=0.5, first_loss=1.1, findings=[dead], untrained=frozen)
    result = FixResult(baseline, [swap, lr], budget_steps=40)
    assert result.ranked == [lr, swap] and lr.works and baseline.harmful == []
    assert result.winner is lr and result.repaired
    # a finding in a trained layer too still counts
    both = Finding("dead_units", "warning", 0, ("0.1", "1.1"), "m", {})
    assert Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=1.0, findings=[both], untrained=frozen).harmful == ["dead_units"]


def test_a_shared_activation_recorded_before_a_frozen_first_layer_counts_when_it_cuts_trained_ones():
    """`self.act = nn.ReLU()` after every layer is recorded where it first runs: before a frozen
    first layer, so it read as untrained, and its dead units, which cut the gradient of the
    trained fc1 and fc2, were 'Not counted' (fix then called lr x10 at chance a repair)."""
    shared = Finding("dead_units", "error", 0, ("act",), "m", {"zero_gradient_layers": ["fc1", "fc2"]})
    frozen = Finding("dead_units", "error", 0, ("act",), "m", {"zero_gradient_layers": ["fc0"]})
    base = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=1.38, first_loss=1.39, findings=[shared],
                 untrained=frozenset({"fc0", "act"}), trained=frozenset({"fc1", "fc2"}))
    assert base.counted == [shared] and base.harmful == ["dead_units"]
    base.findings = [frozen]  # the same units cutting only the frozen layer: not counted
    assert base.frozen_only == [frozen] and base.harmful == []
