"""A slow script (20 s a step): fix says how far a trial has come and what the rest will cost, and
never screens for longer than the budget."""

import subprocess
import sys

import torch
from torch import nn

from gradwatch.fix import BASELINE, Trial, expected_cost, fix, screen_steps
from gradwatch.fix import inject, trial
from gradwatch.fix.candidates import clip_norm, lr_scale


def test_screening_is_never_longer_than_the_budget(tmp_path):
    """`--budget-steps 4` screened each remedy for 10 steps, then ran the finals for 4."""
    assert [screen_steps(b) for b in (4, 12, 40, 200)] == [4, 10, 10, 50]

    def train():
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()

    result = fix(train, out=tmp_path, budget_steps=4, candidates=[lr_scale(0.1), clip_norm(1.0)],
                 progress=lambda m: None)
    assert result.screen_steps == 4 and [t.steps for t in result.screened] == [4, 4]


def test_the_cost_of_the_trials_to_come_is_said_at_the_baselines_pace():
    slow = Trial(BASELINE, None, 0, seconds=400.0, steps=40)  # 10 s a step
    queue = [lr_scale(0.1), clip_norm(1.0), lr_scale(10.0)]
    said = expected_cost(slow, queue, 10, 2)
    minutes = 10 * (3 * 10 + 2 * 40) / 60  # three screened for 10 steps, two finals of 40
    assert "10 s a step" in said and f"about {minutes:.0f} min more" in said
    assert f"about {10 * 3 * 40 / 60:.0f} min" in expected_cost(slow, queue, 0, 2)
    fast = Trial(BASELINE, None, 0, seconds=8.0, steps=40)
    assert expected_cost(fast, queue, 10, 2) is None  # a minute at most: nothing to warn of


def test_a_running_trial_says_how_far_it_has_come(tmp_path, monkeypatch):
    """The trial's process writes its steps (inject.PROGRESS); fix reads them every HEARTBEAT seconds."""
    monkeypatch.setattr(trial, "HEARTBEAT", 0.1)
    script = f"import pathlib, time; pathlib.Path({str(tmp_path)!r}, 'progress.txt').write_text('3'); time.sleep(0.5)"
    heard: list[str] = []
    running = trial.Process(subprocess.Popen([sys.executable, "-c", script]), None, None, tmp_path, heard.append)
    code = running._wait(10, None)
    assert code == 0 and heard and "3 of 10 steps after" in heard[-1] and "more at this pace" in heard[-1]
    slept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert trial.Process(slept, None, None, tmp_path, None)._wait(10, 0.3) == -9 and slept.poll() is not None  # the timeout kills it


def test_the_trial_process_writes_its_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(inject, "PROGRESS_EVERY", 0.0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    injector = inject.Injector({}, max_steps=None, run_dir=tmp_path)
    injector.install_late()
    try:
        for _ in range(3):
            model(torch.randn(4, 2)).sum().backward()
            opt.step()
    finally:
        injector.remove()
    assert (tmp_path / inject.PROGRESS).read_text().strip() == "3"


def test_a_fast_trial_writes_its_steps_seldom(tmp_path):
    """At most one write a PROGRESS_EVERY: a script at 1 ms a step is not slowed by a file write each."""
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    injector = inject.Injector({}, max_steps=None, run_dir=tmp_path)
    injector.install_late()
    try:
        for _ in range(50):
            model(torch.randn(4, 2)).sum().backward()
            opt.step()
    finally:
        injector.remove()
    assert inject.PROGRESS_EVERY >= 1.0 and not (tmp_path / inject.PROGRESS).exists()
