"""One reading of a NaN/Inf finding's evidence (`nan_cause`) serves diagnose's causes, fix's locating
run and fix's closing note: the four hand-built cases below are read alike by all three."""

import math

import pytest
import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import nan_note, print_result
from gradwatch.diagnose import advice
from gradwatch.diagnose.finding import Finding
from gradwatch.fix import BASELINE, FixResult, Trial, fix, nan_to_locate
from gradwatch.fix.candidates import Candidate
from gradwatch.fix.locate import Origin
from series_builder import build

# (first step, growth before it, at_init): what each reading should be
CASES = {
    "measured small": (7, 0.8, False),
    "unknown, step 3": (3, math.nan, False),
    "large": (40, 1e6, False),
    "step 0": (0, math.nan, True),
}
EXPECTED = {"measured small": "data", "unknown, step 3": "unknown", "large": "growth", "step 0": "data"}


def _evidence(case: str) -> dict:
    step, growth, at_init = CASES[case]
    return {"step": step, "first_seen_in": "loss", "at_init": at_init, "grad_growth_before": growth}


def _result(case: str) -> FixResult:
    f = Finding("non_finite", "error", CASES[case][0], (), "m", _evidence(case))
    return FixResult(Trial(BASELINE, None, 0, math.inf, steps=60, findings=[f]), [], budget_steps=60)


@pytest.mark.parametrize("case", CASES)
def test_diagnose_and_fix_read_a_nan_alike(case):
    cause = advice.nan_cause(_evidence(case))
    assert cause == EXPECTED[case]
    causes, remedies = advice.non_finite(advice.Context(build(optimizer="SGD")), (), _evidence(case))
    data_first = causes[0].startswith("bad input data")
    promised = any("runs the script again to that step" in r.action for r in remedies)
    located = nan_to_locate(_result(case).baseline) is not None
    assert data_first == promised == located == (cause != "growth")  # what diagnose promises, fix runs
    assert ("exp of more than ~88" in causes[0]) == data_first  # a hand-written softmax overflows there
    lr_cause = [c for c in causes if c.startswith("learning rate")]
    assert len(lr_cause) == 1 and ("grew" in lr_cause[0]) == (cause == "growth")  # SGD: the lr is always a suspect
    note = nan_note(_result(case))
    if cause == "growth":
        assert note is None
    else:
        assert ("No training remedy repairs that" in note) == (cause == "data")
        assert ("before any update" in note) == (case == "step 0")
        assert ("gw.guard" in note) == (case != "step 0")  # at step 0 it would skip every step


def test_an_unknown_growth_keeps_both_causes_and_an_adaptive_optimizer_is_blamed_only_at_a_high_lr():
    evidence = _evidence("unknown, step 3")
    causes, _ = advice.non_finite(advice.Context(build(optimizer="Adam", lr=1e-3)), (), evidence)
    assert [c.split(":")[0] for c in causes] == ["bad input data"]
    causes, _ = advice.non_finite(advice.Context(build(optimizer="Adam", lr=0.5)), (), evidence)
    assert [c.split(":")[0] for c in causes] == ["bad input data", "learning rate"]
    causes, _ = advice.non_finite(advice.Context(build(optimizer="Adam", lr=0.5)), (), _evidence("measured small"))
    assert [c.split(":")[0] for c in causes] == ["bad input data"]  # measured: the lr did not do it


def test_a_winner_over_a_nan_of_unknown_cause_is_not_told_it_came_from_the_data():
    for case, claims in (("unknown, step 3", False), ("measured small", True)):
        result = _result(case)
        result.origin = Origin("aten.log.default", "/x/t.py", 22, "return torch.log(var)", True, "NaN")
        result.trials.append(Trial(Candidate("learning rate x0.1", {"lr_scale": 0.1}), None, 0, 1.0, steps=60,
                                   final_loss=0.5))
        assert result.repaired
        console = Console(record=True, width=400)
        print_result(result, console)
        text = console.export_text()
        assert "t.py:22: `return torch.log(var)`" in text and "may only put it off past 60 steps" in text
        assert ("came from the data or the arithmetic, not from training" in text) == claims


def test_a_nan_too_early_to_measure_growth_is_located(tmp_path):
    """A NaN in the second batch: one finite step before it, no growth to measure. diagnose promised
    the locating run; fix did not run it (it ran only for a measured small growth)."""
    def train():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = torch.randn(12, 16, 8), torch.randn(12, 16, 1)
        x[1, 3, 0] = float("nan")  # one bad row in batch 1
        for i in range(12):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[i]), y[i]).backward()
            opt.step()

    result = fix(train, out=tmp_path, budget_steps=12, progress=lambda m: None)
    finding = next(f for f in result.baseline.findings if f.kind == "non_finite")
    assert finding.first_step == 1 and advice.nan_cause(finding.evidence) == "unknown"
    assert result.located is not None and result.origin is not None and "model(x[i])" in result.origin.code
    assert not result.repaired
    note = nan_note(result)
    assert "step 1" in note and "model(x[i])" in note and "No training remedy repairs that" not in note
    assert "before any update" not in note  # step 1 came after one


def test_in_a_notebook_the_locating_run_is_gw_fix_not_the_kernels_launcher():
    run = build()
    run.meta["command"] = ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f", "/root/kernel-1.json"]
    _, remedies = advice.non_finite(advice.Context(run), (), _evidence("measured small"))
    assert "`gw.fix(train_fn)`" in remedies[0].action and "kernel" not in remedies[0].action.split("trains")[0]
    run.meta["command"] = ["train.py", "--lr", "0.1"]
    _, remedies = advice.non_finite(advice.Context(run), (), _evidence("measured small"))
    assert "`gradwatch fix -- python train.py --lr 0.1` runs the script again" in remedies[0].action


def test_weights_non_finite_before_any_update_are_not_located():
    """No operation of the script's steps made them (the initialisation, a loaded checkpoint): a
    locating run would look for one that is not there."""
    evidence = {**_evidence("step 0"), "nonfinite_weights_at_start": ["0"]}
    f = Finding("non_finite", "error", 0, ("0",), "m", evidence)
    baseline = Trial(BASELINE, None, 0, math.inf, steps=60, findings=[f])
    assert advice.nan_cause(evidence) == "weights" and nan_to_locate(baseline) is None
    assert nan_note(FixResult(baseline, [], budget_steps=60)) is None
