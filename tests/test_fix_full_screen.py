"""A screening that would run most of the budget runs all of it, and a final of one screened remedy
is then its screening trial, not a second run of the same steps."""

import inspect
import sys

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import print_interrupted
from gradwatch.fix import BASELINE, FixResult, Trial, expected_cost, fix, full_length, screen_in_full, screen_steps
from gradwatch.fix.candidates import clip_norm, lr_scale
from gradwatch.fix.trial import run_trial_in_process
from gradwatch.store import read_run


def late_blow_up(raised_to: float = 0.3):
    """Healthy for 20 steps of 40, then the lr raised from 0.01 to `raised_to` (30x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = torch.randn(8, 1)
    for step in range(40):
        if step == 20:
            for group in opt.param_groups:
                group["lr"] = raised_to
        x = torch.randn(32, 8)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x @ w).backward()
        opt.step()


def test_the_whole_budget_when_it_costs_at_most_one_full_trial_more():
    # 4 remedies at 187 of 200 steps: 52 steps more in all, less than the leader's final of 200
    assert screen_in_full(187, 200, 4) and not screen_in_full(50, 200, 4)  # 600 more: a quarter stays
    assert screen_in_full(100, 120, 2) and not screen_in_full(124, 200, 4)
    assert screen_in_full(117, 120, 4)  # a GRU's script ends at 120 of a budget of 200
    assert screen_in_full(screen_steps(200), 200, 1)  # one remedy: its screening is its final


def test_a_script_that_ends_before_the_budget_is_screened_to_its_end(tmp_path):
    """Budget 200, the script's 40 steps: a quarter counted from the onset at 20 is 70 steps, past the end:
    screened to its end, and the leader is not run again."""
    result = fix(late_blow_up, out=tmp_path, budget_steps=200, candidates=[lr_scale(0.1), clip_norm(1.0)],
                 progress=lambda m: None)
    assert not result.baseline.cut and result.baseline.steps == 40
    assert all(not t.cut for t in result.screened) and not list(tmp_path.glob("trial-*"))
    assert result.repaired and any(result.winner is t for t in result.screened)


def test_a_final_screened_in_full_is_not_run_again(tmp_path):
    said = []
    result = fix(late_blow_up, out=tmp_path, budget_steps=40, candidates=[lr_scale(0.1), clip_norm(1.0)],
                 progress=said.append)
    assert result.screen_steps == 40 and all(t.steps <= 40 for t in result.screened)
    assert result.trials and all(any(t is s for s in result.screened) for t in result.trials)
    assert not list(tmp_path.glob("trial-*")) and any("ran as far as a full one" in m for m in said)
    # counted once: the baseline and each screening trial, as their stores hold them
    ran = ["baseline", *(t.run_dir.name for t in result.screened)]
    assert result.cost_steps == sum(len(read_run(tmp_path / name).steps) for name in ran)
    # the screening trial is the full trial: a run of its own at the budget trains the same
    leader = result.ranked[0]
    again = run_trial_in_process(late_blow_up, tmp_path / "again", leader.candidate, 40)
    assert np.array_equal(read_run(again.run_dir).loss, read_run(leader.run_dir).loss, equal_nan=True)


def test_the_cost_said_for_a_screening_in_full_names_no_second_run_of_it():
    slow = Trial(BASELINE, None, 0, seconds=1200.0, steps=120)  # 10 s a step; the script ends at 120
    said = expected_cost(slow, [lr_scale(0.1), clip_norm(1.0)], 200, 2)
    assert "screen in full (120 steps each), then up to 2 full trials of them combined" in said
    assert "200" not in said


def test_an_interrupted_fix_lists_a_final_screened_in_full_once():
    base = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=2.0)
    lead = Trial(lr_scale(0.1), None, 0, 1.0, steps=40, final_loss=0.5)
    other = Trial(clip_norm(1.0), None, 0, 1.0, steps=40, final_loss=0.9)
    result = FixResult(base, [lead], budget_steps=40, screen_steps=40, screened=[lead, other])
    console = Console(record=True, width=400)
    print_interrupted(result, console)
    text = console.export_text()
    assert text.count(f"{lead.candidate.name} (") == 1 and text.count(f"{other.candidate.name} (") == 1
    assert result.cost_steps == 120  # the baseline and the two screening trials, each run once


def test_a_baseline_that_raised_on_its_fault_does_not_set_the_full_length():
    """A script that raises on its NaN loss at step 23 of a 40-step budget: a remedy keeping the loss
    finite runs to 40, so screening 4 remedies in full costs 72 steps more, not at most one trial."""
    raised = Trial(BASELINE, None, 1, 1.0, steps=23)
    ended = Trial(BASELINE, None, 0, 1.0, steps=23)  # the script's own end: trials stop there too
    assert full_length(raised, 40) == 40 and full_length(ended, 40) == 23
    assert not screen_in_full(22, full_length(raised, 40), 4) and screen_in_full(22, full_length(ended, 40), 4)
    slow = Trial(BASELINE, None, 1, seconds=2300.0, steps=23)
    assert "screen for 22 steps each, then up to 2 full trials of 40" in expected_cost(
        slow, [lr_scale(0.1), clip_norm(1.0)], 22, 2, full_length(slow, 40))


@pytest.mark.skipif(sys.platform == "win32", reason="trials pause over POSIX pipes")
def test_where_trials_pause_a_late_fault_is_screened_a_quarter_past_its_onset(tmp_path, monkeypatch):
    """The same late blow-up as a script: its screening trials pause at 30 steps (10 past the onset
    at 20) instead of running all 40, and the final runs on from its pause: no step is run twice."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "train.py"
    path.write_text(f"import torch\nfrom torch import nn\n{inspect.getsource(late_blow_up)}\nlate_blow_up()\n")
    result = fix([sys.executable, str(path)], out=tmp_path / "fix", budget_steps=40,
                 candidates=[lr_scale(0.1), clip_norm(1.0)], progress=lambda m: None)
    assert screen_in_full(30, 40, 2)  # in process, it would be screened in full
    assert result.screen_steps == 30 and all(t.steps == 30 for t in result.screened)
    assert result.repaired and result.winner.resumed_from == 30
    assert result.cost_steps == 40 + 2 * 30 + sum(t.steps - t.resumed_from for t in result.trials) < 40 + 2 * 40 + 10


@pytest.mark.skipif(sys.platform == "win32", reason="trials pause over POSIX pipes")
def test_where_trials_cannot_pause_a_late_fault_is_screened_in_full(tmp_path, monkeypatch):
    """The same script run by a shell, whose python is not fix's own child: screened in full, as in
    process, and the finals are the screening trials."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "train.py"
    path.write_text(f"import torch\nfrom torch import nn\n{inspect.getsource(late_blow_up)}\nlate_blow_up()\n")
    result = fix(["sh", "-c", f"{sys.executable} {path}; true"], out=tmp_path / "fix", budget_steps=40,
                 candidates=[lr_scale(0.1), clip_norm(1.0)], progress=lambda m: None)
    assert result.screen_steps == 40 and result.spent == 0 and result.repaired
    assert all(any(t is s for s in result.screened) for t in result.trials)
    assert result.cost_steps == 3 * 40
