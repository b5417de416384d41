"""A screening trial pauses at its budget, and the final of that remedy runs it on from there: the
same training as one run of the whole budget, its first steps paid for once."""

import importlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradwatch.fix import BASELINE, Trial, applied, first_rung, fix
from gradwatch.fix.candidates import clip_norm, clip_value, lr_scale
from gradwatch.fix.inject import BUDGET_REACHED, PAUSABLE
from gradwatch.fix.trial import go_on, run_trial
from gradwatch.store import read_run

fix_module = importlib.import_module("gradwatch.fix")  # the package (gradwatch.fix is the function)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="trials pause over POSIX pipes")

SCRIPT = """
import sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=float(sys.argv[1]))
x = torch.randn(64, 16)
y = x.sum(1, keepdim=True)
try:
    for step in range(120):
        if step == 5 and len(sys.argv) > 2 and sys.argv[2] != "-":
            open(sys.argv[2], "w").write("a checkpoint")
        opt.zero_grad()
        nn.functional.mse_loss(model(x + 0.1 * torch.randn_like(x)), y).backward()
        opt.step()
finally:
    if len(sys.argv) > 3:
        open(sys.argv[3], "w").write("the trial's last weights")
"""


def script(tmp_path: Path, *args: str) -> list[str]:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return [sys.executable, str(path), *args]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_a_paused_trial_run_on_trains_as_one_run_of_the_whole_budget(tmp_path):
    cmd = script(tmp_path, "0.01")
    paused = run_trial(cmd, tmp_path / "paused", lr_scale(0.5), 20, pause=True)
    assert paused.process is not None and paused.steps == 20 and paused.cut
    at_pause = read_run(paused.run_dir).loss
    final = go_on(paused, 60)
    assert final.process is None and final.steps == 60 and final.resumed_from == 20 and final.exit_code == 0
    whole = run_trial(cmd, tmp_path / "whole", lr_scale(0.5), 60)
    ran, once = read_run(final.run_dir), read_run(whole.run_dir)
    assert np.array_equal(at_pause, once.loss[:20])  # measured at the pause as a 20-step trial is
    assert np.array_equal(ran.loss, once.loss) and np.array_equal(ran.steps, once.steps)
    assert np.array_equal(ran.metrics["weight_norm"], once.metrics["weight_norm"], equal_nan=True)
    assert final.final_loss == whole.final_loss and [f.kind for f in final.findings] == [f.kind for f in whole.findings]


def test_a_trial_fix_did_not_start_itself_ends_at_its_budget(tmp_path):
    """A shell's command (a launcher's worker alike) is no child of fix: the pipes' numbers are not
    its own, so it ends at the budget as before, and fix runs its final from the start."""
    cmd = ["sh", "-c", " ".join(script(tmp_path, "0.01")) + "; true"]
    ended = run_trial(cmd, tmp_path / "t", lr_scale(0.5), 20, pause=True)
    assert ended.process is None and ended.steps == 20 and ended.cut and ended.exit_code == 0


def test_a_paused_trial_leaves_ctrl_c_to_fix_and_ends_when_fix_is_gone(tmp_path):
    """Ctrl-C reaches the paused trial too: it waits for fix (a script's `except KeyboardInterrupt`
    would write into the directory fix has put back). fix killed: its ends of the pipes close, and
    the paused trial stores its steps and exits, marked as ended by its budget: no process outlives fix."""
    paused = run_trial(script(tmp_path, "0.01"), tmp_path / "t", lr_scale(0.5), 20, pause=True)
    os.kill(paused.process.proc.pid, signal.SIGINT)
    time.sleep(0.5)
    assert paused.process.proc.poll() is None
    paused.process.channel.close()
    assert paused.process.proc.wait(60) == 0
    assert (paused.run_dir / BUDGET_REACHED).is_file() and len(read_run(paused.run_dir).steps) == 20
    paused.process.log.close()


def children() -> list[int]:
    """This process's live children (Linux: /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


FORKED = """
import multiprocessing as mp
import torch
from torch import nn

def train():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(60):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()

if __name__ == "__main__":
    torch.zeros(1)  # (torch imported in the parent: the watch and the remedy start there, then fork)
    child = mp.get_context("fork").Process(target=train)
    child.start()
    child.join()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="a forked child")
def test_a_forked_child_that_trains_does_not_pause_on_fixs_pipe(tmp_path):
    """Its copy of the remedy was made before the fork: paused there, fix measured 0 steps while the
    parent waited in join()."""
    path = tmp_path / "forked.py"
    path.write_text(FORKED)
    t = run_trial([sys.executable, str(path)], tmp_path / "t", lr_scale(0.5), 20, pause=True)
    assert t.process is None and t.exit_code == 0


def test_the_first_rung_is_halfway_through_the_steps_past_the_onset():
    assert first_rung(50, 0) == 25 and first_rung(70, 20) == 45
    assert first_rung(38, 20) is None  # 9 steps past the onset: fewer than a screening's least


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts child processes in /proc")
def test_fix_screens_in_two_rungs_runs_the_leader_on_and_pays_for_each_step_once(tmp_path, monkeypatch):
    """Its script saves its weights in a `finally:`, as it ends: a paused trial ended after the last
    put-back wrote them over the user's own file. What it writes as it ends is put aside."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "last.txt").write_text("mine")
    result = fix(script(tmp_path, "0.3", "-", "last.txt"), out=tmp_path / "fix", budget_steps=80,
                 candidates=[lr_scale(0.1), clip_norm(1.0), lr_scale(0.01)], progress=lambda m: None)
    assert (tmp_path / "last.txt").read_text() == "mine" and "last.txt" in result.written
    assert (tmp_path / "fix" / "baseline" / "written" / "last.txt").is_file()
    assert all((t.run_dir / "written" / "last.txt").is_file() for t in result.screened)
    assert result.screen_steps == 20 and result.rung_steps == 10 and result.repaired
    behind = [t for t in result.screened if t.behind]
    assert len(behind) == 1 and behind[0].steps == 10 and applied(result.screened)[-1] is behind[0]
    assert all(t.steps == 20 and t.resumed_from == 0 for t in result.screened if not t.behind)
    run_on = [t for t in result.trials if t.resumed_from]
    assert run_on and all(t.resumed_from == 20 and t.run_dir.name.startswith("screen-") for t in run_on)
    assert result.cost_steps == result.baseline.steps + sum(t.steps for t in result.screened) + sum(
        t.steps - t.resumed_from for t in result.trials)
    assert all(t.process is None for t in result.screened) and not children()


def test_trials_that_cannot_pause_are_screened_in_one_rung(tmp_path):
    """A shell's command is not fix's own child: its baseline says so, and no trial stops at a rung
    to run again from its start."""
    cmd = ["sh", "-c", " ".join(script(tmp_path, "0.3")) + "; true"]
    result = fix(cmd, out=tmp_path / "fix", budget_steps=80, candidates=[lr_scale(0.1), clip_norm(1.0)],
                 progress=lambda m: None)
    assert not (result.baseline.run_dir / PAUSABLE).exists()
    assert result.rung_steps == 0 and result.spent == 0 and all(t.steps == 20 for t in result.screened)
    assert not any(t.resumed_from for t in result.trials)
    assert result.cost_steps == result.baseline.steps + sum(t.steps for t in result.screened) + sum(
        t.steps for t in result.trials if all(t is not s for s in result.screened))


def test_a_paused_trial_that_wrote_a_file_is_not_run_on(tmp_path, monkeypatch):
    """What it wrote (a checkpoint it may load later) is put aside after its screening: run on, it
    would miss it, so its final runs from the start."""
    monkeypatch.chdir(tmp_path)
    result = fix(script(tmp_path, "0.3", "ckpt.txt"), out=tmp_path / "fix", budget_steps=80,
                 candidates=[lr_scale(0.1), clip_norm(1.0)], progress=lambda m: None)
    assert result.screen_steps < 80 and result.trials
    assert all(t.resumed_from == 0 and t.run_dir.name.startswith("trial-") for t in result.trials)
    assert not (tmp_path / "ckpt.txt").exists() and "ckpt.txt" in result.written


class Paused:
    def __init__(self, memory: int = 0):
        self.channel = type("Channel", (), {"memory": memory})()


def test_the_best_screened_are_kept_paused_within_a_share_of_free_memory(monkeypatch):
    ended = []
    monkeypatch.setattr(fix_module, "available_memory", lambda: 10e9)
    trials = [Trial(BASELINE, Path("t"), 0, 1.0, steps=20, final_loss=loss, first_loss=2.0, process=Paused(1e9))
              for loss in (0.5, 0.1, 0.9, 0.3, 0.7)]
    fix_module.keep_paused(trials, lambda t: ended.append(t.final_loss))
    assert sorted(ended) == [0.7, 0.9]  # the three best kept (PAUSED_MAX)
    ended.clear()
    monkeypatch.setattr(fix_module, "available_memory", lambda: 5e9)  # half of it: 2.5 GB, two of 1 GB
    fix_module.keep_paused(trials, lambda t: ended.append(t.final_loss))
    assert sorted(ended) == [0.5, 0.7, 0.9]


def _screened(losses: dict[str, float], rung_only: set[str] = frozenset()):
    """A fake `trial` for `_screen`: each remedy cut at the steps asked, paused, at its loss; those in
    `rung_only` blow up at step 7, before the rung, and end there."""
    ran = []

    def trial(name, cand, steps, pause=False, paused=None):
        ran.append((cand.name, steps, paused is not None))
        if cand.name in rung_only:
            return Trial(cand, Path(name), 0, 1.0, steps=7, final_loss=float("inf"), first_loss=2.0)
        return Trial(cand, Path(name), 0, 1.0, steps=steps, final_loss=losses[cand.name] / steps, first_loss=2.0,
                     cut=True, process=Paused())
    return trial, ran


def test_the_worse_half_ranks_after_the_better_one_and_the_better_half_runs_on_from_its_pause(monkeypatch, tmp_path):
    """Eight remedies: the better four run on from their pause (none ended before it by the cap on
    paused trials); a remedy that blew up before the rung is in the worse half too, ranked last."""
    monkeypatch.setattr(fix_module, "available_memory", lambda: 1e12)
    cands = [clip_norm(x) for x in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)] + [clip_value(1.0)]
    losses = {c.name: 10.0 + i for i, c in enumerate(cands)}
    trial, ran = _screened(losses, rung_only={clip_value(1.0).name})
    result = fix_module.FixResult(Trial(BASELINE, Path("b"), 0, 1.0, steps=200), [], budget_steps=200,
                                  screen_steps=50)
    ended = []
    fix_module._screen(trial, ended.append, list(cands), result, 0, False, lambda m: None, tmp_path)
    run_on = [name for name, steps, resumed in ran if resumed]
    assert result.rung_steps == 25 and run_on == [c.name for c in cands[:4]] and result.spent == 0
    assert [t.behind for t in result.screened] == [False] * 4 + [True] * 4
    assert applied(result.screened)[-1].candidate == clip_value(1.0)
    assert all(t.steps == 50 for t in result.screened[:4]) and all(t.steps == 25 for t in result.screened[4:7])


def test_trials_pause_where_the_baselines_process_could(monkeypatch, tmp_path):
    """Known from the baseline before screening: fix's own child on the CPU (inject's PAUSABLE), the
    free memory known, not in process."""
    (tmp_path / PAUSABLE).write_text("")
    base = Trial(BASELINE, tmp_path, 0, 1.0, steps=200)
    monkeypatch.setattr(fix_module, "available_memory", lambda: 1e9)
    assert fix_module._pausable(base, False) and not fix_module._pausable(base, True)
    monkeypatch.setattr(fix_module, "available_memory", lambda: 0.0)  # unknown: nothing would stay paused
    assert not fix_module._pausable(base, False)
    monkeypatch.setattr(fix_module, "available_memory", lambda: 1e9)
    (tmp_path / PAUSABLE).unlink()
    assert not fix_module._pausable(base, False)


def test_no_rung_where_trials_cannot_pause(tmp_path):
    """Every remedy would run again from its start: a rung's worse half would save nothing."""
    cands = [clip_norm(1.0), clip_norm(2.0), clip_value(1.0)]
    trial, ran = _screened({c.name: 10.0 for c in cands})
    result = fix_module.FixResult(Trial(BASELINE, Path("b"), 0, 1.0, steps=200), [], budget_steps=200,
                                  screen_steps=50)
    fix_module._screen(trial, lambda t: None, list(cands), result, 0, True, lambda m: None, tmp_path)
    assert result.rung_steps == 0 and [steps for _, steps, _ in ran] == [50, 50, 50]


def test_a_first_trial_that_could_not_pause_is_said_to_run_again(tmp_path):
    """A tester read "screening 1/4 (12 steps)" of a trial that ran 25: it could not pause at the
    rung, so it ran again to the screening's length, and so did every remedy after it, unsaid."""
    cands = [clip_norm(1.0), clip_value(1.0)]
    paused_trial, ran = _screened({c.name: 10.0 for c in cands})

    def trial(name, cand, steps, pause=False, paused=None):
        t = paused_trial(name, cand, steps, pause, paused)
        t.process = None  # (it wrote files: pause.py lets it run to its end)
        return t
    result = fix_module.FixResult(Trial(BASELINE, Path("b"), 0, 1.0, steps=200), [], budget_steps=200,
                                  screen_steps=50)
    said: list[str] = []
    fix_module._screen(trial, lambda t: None, list(cands), result, 0, False, said.append, tmp_path)
    assert [steps for _, steps, _ in ran] == [25, 50, 50] and result.rung_steps == 0
    assert said[0] == f"gradwatch fix: screening 1/2 (25 steps): {cands[0].name}"
    assert said[1].startswith(f"gradwatch fix: screening {cands[0].name}: again from its start, to 50 steps")
    assert said[2] == f"gradwatch fix: screening 2/2 (50 steps): {cands[1].name}" and len(said) == 3


def test_a_run_on_trials_pace_counts_only_the_steps_since_it_went_on(tmp_path):
    from gradwatch.fix.trial import _how_far

    (tmp_path / "progress.txt").write_text("51")
    said = _how_far(tmp_path, 160, 3.0, since=40)  # 11 steps in 3 s since the pause at 40
    assert "51 of 160 steps" in said and "about 30s more" in said
