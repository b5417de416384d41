"""gradwatch fix on scripts as users write them: what it runs them with, and the advice it prints."""

import importlib
import subprocess

import pytest
import torch

from gradwatch.errors import ConfigError
from gradwatch.fix import Candidate, Trial, fix
from gradwatch.fix.trial import OUTPUT_LOG, run_trial

fix_module = importlib.import_module("gradwatch.fix")  # the package (gradwatch.fix is the function)


def test_a_trial_gives_the_script_no_input_and_a_script_that_asks_is_told_why_it_stopped(tmp_path, monkeypatch):
    """A script that asks `input("resume from checkpoint? [y/N]")`: its prompt went to the trial's
    log, unseen, and `gradwatch fix` waited on the terminal forever with nothing on the screen."""
    monkeypatch.chdir(tmp_path)
    seen = {}

    class Popen:  # the script: it asks, reads EOF and fails
        def __init__(self, command, **kwargs):
            seen.update(kwargs)
            kwargs["stdout"].write(b'resume? [y/N] Traceback (most recent call last):\nEOFError: EOF when reading a line\n')

        def wait(self, timeout=None):
            return 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(subprocess, "Popen", Popen)
    trial = run_trial(["python", "ask.py"], tmp_path / "t", Candidate("baseline"), 5)
    assert seen["stdin"] is subprocess.DEVNULL and trial.exit_code == 1
    assert "EOFError" in (tmp_path / "t" / OUTPUT_LOG).read_text()
    with pytest.raises(ConfigError, match="(?s)asked for input.*argument.*EOFError: EOF when reading a line"):
        fix(["python", "ask.py"], out=tmp_path / "fix", budget_steps=5, progress=lambda m: None)


def _trial(name: str, loss: float, *kinds: str, code: int = 0, steps: int = 20) -> Trial:
    from pathlib import Path

    from gradwatch.diagnose.finding import Finding
    return Trial(Candidate(name, {"x": name}, f"# {name}"), Path("runs/fix") / name, code, 0.1, steps=steps,
                 final_loss=loss, first_loss=2.0, findings=[Finding(k, "error", 0, (), "m", {}) for k in kinds])


def test_a_script_that_fails_at_its_end_still_shows_what_its_trial_found():
    """A script that trains 150 steps then exits 2 ("accuracy too low"): the baseline's row said only
    that the script failed, hiding the vanishing gradient its 150 steps showed, the fault fix repaired."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result
    from gradwatch.fix import FixResult

    base = _trial("baseline", 0.677, "vanishing_gradient", code=2, steps=150)
    result = FixResult(base, [_trial("selu", 0.0015)], budget_steps=200)
    console = Console(record=True, width=300)
    print_result(result, console)
    row = next(line for line in console.export_text().splitlines() if "baseline" in line and "0.677" in line)
    assert "vanishing_gradient" in row and "exit 2, step 150" in row
    crashed = _trial("crashed", float("inf"), code=1, steps=0)  # nothing ran: nothing to show but the failure
    console = Console(record=True, width=300)
    print_result(FixResult(base, [crashed]), console)
    row = next(line for line in console.export_text().splitlines() if "crashed" in line)
    assert "│ the script failed (exit 1, step 0)" in row


def test_a_fix_result_is_shown_in_one_line():
    """`res = gw.fix(train_fn); res` in a notebook printed the dataclass: every trial, its every finding."""
    from gradwatch.fix import FixResult

    base = _trial("baseline", 0.7, "vanishing_gradient")
    shown = repr(FixResult(base, [_trial("selu", 0.02)], budget_steps=100, screened=[_trial("selu", 0.2)] * 5))
    assert shown.count("\n") == 0 and len(shown) < 200
    assert "winner='selu'" in shown and "repaired=True" in shown and "0.7 -> 0.02" in shown
    assert "winner=None" in repr(FixResult(base, [], budget_steps=100))


CYCLIC = """
import torch
from torch import nn
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.05, max_lr=1.5, step_size_up=60)
lrs = []
for _ in range(120):
    opt.step()
    lrs.append(opt.param_groups[0]["lr"])
    sched.step()
"""


@pytest.mark.parametrize("schedule, peak", [("CyclicLR(opt, base_lr=0.05, max_lr=1.5, step_size_up=60)", 1.5),
                                            ("OneCycleLR(opt, max_lr=[1.5], total_steps=120)", 1.5)])
def test_the_adam_change_under_a_cyclic_schedule_rebuilds_it_at_the_lrs_the_trial_ran(schedule, peak):
    """A CyclicLR(base_lr=0.05, max_lr=1.5): the Adam trial ran at 1e-3 up to 0.03 (it follows the
    schedule's factor), but the code said only "OneCycleLR: max_lr=1e-3"; kept as it was, the
    CyclicLR drives the pasted Adam from 0.05 to 1.5, the lrs of SGD. Now the script's own line comes
    with the lrs the trial's Adam ran at, and one value for the one group the printed Adam has."""
    import numpy as np

    from gradwatch.diagnose.advice import Context
    from gradwatch.fix.candidates import adam
    from gradwatch.fix.names import read_names
    from gradwatch.store.series import RunSeries

    source = CYCLIC.replace("CyclicLR(opt, base_lr=0.05, max_lr=1.5, step_size_up=60)", schedule)
    run = Context(RunSeries([], np.arange(60), np.ones(60), np.linspace(0.05, 1.5, 60), {}, meta={"optimizer": "SGD"}))
    code = adam(read_names(source, run)).code
    built = [line for line in source.splitlines() if line.startswith(("opt = ", "sched = "))]
    ns: dict = {}
    exec(source.replace(built[0] + "\n" + built[1], code), ns)
    assert isinstance(ns["opt"], torch.optim.Adam)
    assert max(ns["lrs"]) == pytest.approx(1e-3 * peak / (0.05 if "Cyclic" in schedule else peak), rel=0.02)
    assert min(ns["lrs"]) < max(ns["lrs"]) / 10  # still the script's schedule


ACCUMULATING_NAN = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(50):
    for micro in range(4):  # gradients accumulated over 4 micro-batches a step
        loss = model(torch.randn(8, 4)).pow(2).mean() / 4
        if step >= 3:
            loss = loss * float("nan")
        loss.backward()
    opt.step()
    opt.zero_grad()
"""


def test_a_trial_stopped_on_non_finite_micro_batches_ends_non_finite(tmp_path, monkeypatch):
    """The trial is stopped after 3 non-finite losses in a row, counted by backward: with 4
    micro-batches a step, before any non-finite step was stored. Its stored losses were finite: a
    tester's ZClip 'repaired the run' whose loss was NaN on 181 of 200 steps pasted in."""
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "accumulate.py").write_text(ACCUMULATING_NAN)
    from gradwatch.fix.candidates import lr_scale

    trial = run_trial([sys.executable, "accumulate.py"], tmp_path / "t", lr_scale(0.1), 40)  # (a remedy: stopped)
    assert trial.steps == 3  # steps 0-2, finite: the NaN micro-batches of step 3 stopped it
    assert trial.final_loss == float("inf")


OPTIMIZER_EVERY_STEP = """
import torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
for step in range(60):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # made anew every iteration (its state lost: a bug)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_a_trial_of_a_script_that_makes_its_optimizer_every_step_keeps_to_the_budget(tmp_path, monkeypatch):
    """Each new optimizer stepped once, never the lead's: no step was counted, and a tester's trials
    ran the script's 300 steps whatever the budget."""
    import sys

    from gradwatch.fix.candidates import lr_scale

    monkeypatch.chdir(tmp_path)
    (tmp_path / "remake.py").write_text(OPTIMIZER_EVERY_STEP)
    trial = run_trial([sys.executable, "remake.py"], tmp_path / "t", lr_scale(0.1), 10)
    assert trial.steps == 10 and trial.cut


def test_a_baseline_that_failed_on_input_piped_into_fix_is_told_the_trials_get_none(tmp_path):
    """`cat cfg.json | gradwatch fix -- python train.py`: the script's json.load(sys.stdin) read
    nothing in the baseline, and fix said only 'exit code 1'."""
    import os
    import sys

    (tmp_path / "reads.py").write_text("import json, sys\ncfg = json.load(sys.stdin)\n")
    done = subprocess.run([sys.executable, "-m", "gradwatch", "fix", "--budget-steps", "5", "--", sys.executable,
                           "reads.py"], input='{"lr": 0.1}', capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2
    assert "what was piped into gradwatch fix did not reach the script" in " ".join(done.stderr.split())
    (tmp_path / "reads.py").write_text("import mypkg_not_installed\n")  # failed for another reason: not said
    done = subprocess.run([sys.executable, "-m", "gradwatch", "fix", "--budget-steps", "5", "--", sys.executable,
                           "reads.py"], input='{"lr": 0.1}', capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2 and "ModuleNotFoundError" in done.stderr and "piped" not in done.stderr


RAISES_AFTER_TRAINING = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=3.0)
x = torch.randn(256, 4)
y = x[:, :1] * 2
for step in range(30):
    idx = torch.randint(0, 256, (32,))
    loss = (model(x[idx]) - y[idx]).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
raise RuntimeError("the report server is not running")  # after training: the script's own end
"""


def test_trials_that_fail_as_the_baseline_did_after_training_say_so_and_the_best_before_it(tmp_path, monkeypatch):
    """A tester's script raises after training: every trial exited 1 as the baseline did, the ones
    whose loss went NaN were stopped (exit 0), and fix said only 'No remedy beat the baseline'."""
    import io
    import sys

    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result
    from gradwatch.fix.candidates import lr_scale

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ends.py").write_text(RAISES_AFTER_TRAINING)
    result = fix([sys.executable, "ends.py"], out=tmp_path / "fix", budget_steps=40,
                 candidates=[lr_scale(0.01), lr_scale(10.0)], strategy="all", progress=lambda m: None)
    assert result.baseline.failed and result.baseline.error_line() == "RuntimeError: the report server is not running"
    assert result.winner is None
    out = io.StringIO()
    print_result(result, Console(file=out, width=200))
    text = " ".join(out.getvalue().split())
    assert "Every trial failed as the baseline did: fix the script's error first (before it, learning rate x0.01 " \
           "reached" in text


TWO_OPTIMIZERS_ON_A_SHARED_ENCODER = """
import torch
torch.manual_seed(0)
encoder, head_a, head_b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
opt_a = torch.optim.SGD([*encoder.parameters(), *head_a.parameters()], lr=0.01)
opt_b = torch.optim.SGD([*encoder.parameters(), *head_b.parameters()], lr=0.01)
for step in range(60):
    for head, opt in ((head_a, opt_a), (head_b, opt_b)):  # each task's loss, its own optimizer
        loss = head(torch.relu(encoder(torch.randn(8, 4)))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


def test_a_second_optimizer_sharing_the_leads_weights_is_no_second_step(tmp_path, monkeypatch):
    """A reviewer's multi-task script: counted at every step, its trials stopped at half their budget."""
    import sys

    from gradwatch.fix.candidates import lr_scale

    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.py").write_text(TWO_OPTIMIZERS_ON_A_SHARED_ENCODER)
    trial = run_trial([sys.executable, "two.py"], tmp_path / "t", lr_scale(0.1), 20)
    assert trial.steps >= 19 and trial.cut  # (the second's first step counts once: a new optimizer on the weights)
