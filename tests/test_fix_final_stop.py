"""A second final, after a first that repaired the run, runs to half its steps first and stops there
when its loss is above the first final's at that step beyond the noise: its steps after that are
not paid for, and it ranks after the finals that ran in full."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.fix import BASELINE, Trial, behind_then
from gradwatch.fix.candidates import clip_norm, lr_scale
from gradwatch.fix.trial import final_error, final_loss, run_trial_in_process
from gradwatch.store import read_run

fix_module = importlib.import_module("gradwatch.fix")  # the package (gradwatch.fix is the function)


def regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = torch.randn(8, 1)
    for _ in range(40):
        x = torch.randn(32, 8)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x @ w).backward()
        opt.step()


def test_behind_then_reads_the_first_final_at_the_same_step(tmp_path):
    lead = run_trial_in_process(regression, tmp_path / "lead", lr_scale(1.0), 40)
    loss = read_run(lead.run_dir).loss[:20]
    then, noise = final_loss(loss), final_error(loss, robust=False)  # (stopping reads the wider, spread error)
    assert then > lead.final_loss  # (it trained on: at step 20 it stood higher than at its end)

    def at_20(loss_there: float) -> Trial:
        return Trial(clip_norm(1.0), Path("x"), 0, 1.0, steps=20, final_loss=loss_there, spread_error=noise)

    # against the lead's loss at step 20, not at its end: level with it there is not behind
    assert not behind_then(at_20(then), lead) and not behind_then(at_20(then + 2 * noise), lead)
    assert behind_then(at_20(then + 3 * noise * np.sqrt(2)), lead)
    assert behind_then(at_20(float("inf")), lead)  # a loss gone non-finite is behind a finite one
    unmeasured = at_20(then + 100 * noise)
    unmeasured.spread_error = float("nan")  # one loss in its last tenth: no noise to read it against
    assert not behind_then(unmeasured, lead)


class Paused:
    """A process paused at a trial's last step (a stand-in: the fake trials do not run)."""


def fake_trials(losses: dict[str, float], can_pause: bool = True):
    ran = []

    def trial(name, cand, steps, pause=False, paused=None):
        ran.append((name, cand.name, steps, paused is not None))
        return Trial(cand, Path(name), 0, 1.0, steps=steps, final_loss=losses[cand.name], first_loss=2.0,
                     final_error=0.01, cut=steps < 80, process=Paused() if pause and can_pause else None,
                     resumed_from=paused.steps if paused is not None else 0)  # (as go_on counts it)
    return trial, ran


def run_second(monkeypatch, tmp_path, second_loss: float, can_pause: bool = True):
    lead = Trial(lr_scale(0.1), tmp_path / "lead", 0, 1.0, steps=80, final_loss=0.2, first_loss=2.0)
    monkeypatch.setattr(fix_module, "behind_then", lambda t, first: t.final_loss > 0.5)  # the lead's 0.5 at 40
    trial, ran = fake_trials({"clip norm 1": second_loss}, can_pause)
    paused = Trial(clip_norm(1.0), Path("screen-2"), 0, 1.0, steps=20, final_loss=0.6, first_loss=2.0, cut=True,
                   process=Paused())
    result = fix_module.FixResult(Trial(BASELINE, Path("b"), 0, 1.0, steps=80), [lead], budget_steps=80,
                                  screen_steps=20, rung_steps=10, screened=[paused])
    ended = []
    second = fix_module._unless_behind(trial, ended.append, result, paused, paused.candidate, 40, lead, lambda m: None)
    result.trials.append(second)
    return result, second, ran, ended


def test_a_second_final_behind_halfway_stops_there_and_ranks_last(monkeypatch, tmp_path):
    result, second, ran, ended = run_second(monkeypatch, tmp_path, second_loss=0.9)
    assert ran == [("screen-2", "clip norm 1", 40, True)]  # run on from its screening's pause, to 40 only
    assert second.stopped and second.steps == 40 and ended == [second]
    assert result.cost_steps == 80 + 20 + 80 + 20  # baseline, screening, lead; 20 steps of the second
    assert result.ranked[0].candidate == lr_scale(0.1)


def test_a_second_final_level_halfway_runs_on_from_there(monkeypatch, tmp_path):
    result, second, ran, ended = run_second(monkeypatch, tmp_path, second_loss=0.4)
    assert [r[2:] for r in ran] == [(40, True), (80, True)] and not ended
    assert not second.stopped and second.steps == 80 and second.resumed_from == 20
    assert result.cost_steps == 80 + 20 + 80 + 60  # each of the second's steps paid for once


def test_a_second_final_that_cannot_pause_halfway_runs_again_in_full_unless_behind(monkeypatch, tmp_path):
    result, second, ran, ended = run_second(monkeypatch, tmp_path, second_loss=0.4, can_pause=False)
    assert [r[0] for r in ran] == ["screen-2", "screen-2-again"] and ran[1][2:] == (80, False)
    assert second.steps == 80 and not second.stopped and result.spent == 20
    result, second, ran, ended = run_second(monkeypatch, tmp_path, second_loss=0.9, can_pause=False)
    assert len(ran) == 1 and second.stopped and second.steps == 40 and result.spent == 0


def test_a_ctrl_c_while_reading_the_first_final_ends_the_paused_second(monkeypatch, tmp_path):
    def interrupted(t, first):
        raise KeyboardInterrupt
    lead = Trial(lr_scale(0.1), tmp_path / "lead", 0, 1.0, steps=80, final_loss=0.2, first_loss=2.0)
    monkeypatch.setattr(fix_module, "behind_then", interrupted)
    trial, ran = fake_trials({"clip norm 1": 0.4})
    result = fix_module.FixResult(Trial(BASELINE, Path("b"), 0, 1.0, steps=80), [lead], budget_steps=80,
                                  screen_steps=20, rung_steps=10)
    ended = []
    with pytest.raises(KeyboardInterrupt):
        fix_module._unless_behind(trial, ended.append, result, "trial-2", clip_norm(1.0), 40, lead, lambda m: None)
    assert len(ended) == 1 and ended[0].steps == 40


def test_a_screening_trial_in_the_worse_half_taken_as_a_final_is_not_said_stopped(tmp_path):
    """One that ended before the rung (its loss stayed non-finite) is its own final: it did not stop
    halfway behind the first final, and the table does not say so."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    base = Trial(BASELINE, tmp_path, 0, 1.0, steps=80, final_loss=2.0, first_loss=2.0)
    ended = Trial(clip_norm(1.0), tmp_path, 0, 1.0, steps=7, final_loss=float("inf"), first_loss=2.0, behind=True)
    stopped = Trial(lr_scale(0.1), tmp_path, 0, 1.0, steps=40, final_loss=0.9, first_loss=2.0, stopped=True)
    lead = Trial(lr_scale(0.5), tmp_path, 0, 1.0, steps=80, final_loss=1.2, first_loss=2.0)
    result = fix_module.FixResult(base, [stopped, ended, lead], budget_steps=80)
    assert result.ranked == [lead, ended, stopped]
    console = Console(record=True, width=200)
    print_result(result, console)
    text = console.export_text()
    assert "0.9 at 40 (stopped: behind)" in text and text.count("stopped") == 1
