"""gradwatch fix: candidates from findings, remedies injected through hooks, trials ranked."""

import dataclasses
import json
import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.diagnose.finding import Finding
from gradwatch.errors import ConfigError
from gradwatch.fix import Candidate, FixResult, Trial, fix
from gradwatch.fix.candidates import autotrainer_order, from_findings, lr_ceiling, lr_scale, swap
from gradwatch.fix.inject import Injector, apply_to_model
from gradwatch.fix.trial import final_loss
from test_cli_run import SCRIPTS, gradwatch


@pytest.fixture(autouse=True)
def _in_a_directory_of_its_own(tmp_path, monkeypatch):
    """fix puts the working directory back after every trial: run from the repository, it took a
    test file saved meanwhile for a trial's output and moved it away."""
    monkeypatch.chdir(tmp_path)


def finding(kind, **evidence):
    return Finding(kind, "error", 0, ("fc0",), "m", evidence)


def test_candidates_follow_the_findings():
    explode = [c.name for c in from_findings([finding("exploding_gradient", baseline_norm=3.0)], set())]
    assert explode == ["learning rate x0.1", "Adam (lr 1e-3)", "clip norm 6"]  # twice the measured level
    at_init = [c.name for c in from_findings([finding("exploding_gradient", at_init=True, early_norm=1e9)], {"relu"})]
    assert at_init[-1] == "re-initialise per activation"  # growing from the first step: the init's scale
    # no level before the growth to clip at, and ZClip's warm-up would let its first 25 steps through:
    # the limit diagnose names
    assert "clip norm 1" in at_init and "ZClip" not in at_init
    unmeasured = [c.name for c in from_findings([finding("non_finite")], set())]
    assert unmeasured == ["learning rate x0.1", "Adam (lr 1e-3)", "ZClip"]  # no level: adaptive clipping
    vanish = [c.name for c in from_findings([finding("vanishing_gradient")], {"sigmoid", "relu"})]
    # sparse gradients (nn.Embedding(sparse=True)): Adam refuses them, no Adam trial (a tester's two failed)
    assert not any("Adam" in c.name for c in from_findings([finding("dead_units")], {"relu"}, sparse=True))
    # a loss that differentiates the model by its input (a PINN): smooth swaps only, no SELU or Leaky ReLU
    pinn = [c.name for c in from_findings([finding("vanishing_gradient")], {"sigmoid"}, smooth=True)]
    assert "Sigmoid -> SiLU + He init" in pinn and not any("LeakyReLU" in n or "SELU" in n for n in pinn)
    assert "LayerNorm after each layer" in pinn and "BatchNorm after each layer" not in pinn  # (it mixes samples)
    assert "ReLU -> SiLU + He init" in [c.name for c in from_findings([finding("dead_units")], {"relu"}, smooth=True)]
    assert vanish[0] == "Sigmoid -> LeakyReLU + He init" and "re-initialise per activation" in vanish
    assert "BatchNorm after each layer" in vanish and "activations -> SELU + lecun init" in vanish
    # activations called as functions are no module to swap: no swap trial that would change nothing
    functional = [c.name for c in from_findings([finding("vanishing_gradient")], set())]
    assert not any("->" in n for n in functional) and "re-initialise per activation" in functional
    assert [c.name for c in from_findings([finding("dead_units")], {"relu"})][0] == "ReLU -> LeakyReLU + He init"
    assert from_findings([], {"relu"}) == []
    # a sequence model gets LayerNorm; a hand-written loop gets no optimizer swap
    seq = [c.name for c in from_findings([finding("vanishing_gradient")], {"tanh"}, layer_types={"LSTM", "Linear"})]
    assert "LayerNorm after each layer" in seq and "BatchNorm after each layer" not in seq
    manual = [c.name for c in from_findings([finding("exploding_gradient")], set(), optimizer=None)]
    assert "Adam (lr 1e-3)" not in manual and "learning rate x0.1" in manual
    for adaptive in ("RMSprop", "NAdam", "Adagrad"):  # already adaptive: no swap to Adam (docs/fix.md)
        assert "Adam (lr 1e-3)" not in [c.name for c in from_findings([finding("exploding_gradient")], set(),
                                                                        optimizer=adaptive)]
    through_time = Finding("vanishing_gradient", "warning", 0, ("lstm",), "m", {"sequence_length": 50})
    assert [c.name for c in from_findings([through_time], set(), layer_types={"LSTM"})][:2] == [
        "LSTM forget-gate bias 1", "orthogonal W_hh"]
    # a vanilla RNN is offered a GRU; a high adaptive lr a lower one (against vanishing too)
    assert "nn.RNN -> nn.GRU" in [c.name for c in from_findings([through_time], set(), layer_types={"RNN"})]
    assert "nn.RNN -> nn.GRU" not in [c.name for c in from_findings([through_time], set(), layer_types={"LSTM"})]
    post_ln = [c.name for c in from_findings([finding("vanishing_gradient")], set(), optimizer="Adam", lr=0.02)]
    assert "learning rate x0.1" in post_ln
    assert "learning rate x0.1" not in [c.name for c in from_findings([finding("vanishing_gradient")], set(),
                                                                       optimizer="Adam", lr=1e-3)]
    # a plateau: a higher lr, but not where its loss stalled on an adaptive optimizer's steps too long
    # for the weights (a tester's Adam at 0.05 was screened at 0.5, against its own diagnosis)
    plateau = [c.name for c in from_findings([finding("loss_plateau")], set(), optimizer="Adam", lr=1e-3)]
    assert "learning rate x10" in plateau and "learning rate x0.1" not in plateau
    too_long = [c.name for c in from_findings([finding("loss_plateau", first_update_ratio=0.53)], set(), optimizer="Adam",
                                              lr=0.05)]
    assert "learning rate x0.1" in too_long and "learning rate x10" not in too_long
    assert "learning rate x0.1" not in [c.name for c in from_findings([finding("vanishing_gradient")], set(),
                                                                       optimizer="Adadelta", lr=1.0)]  # a multiplier
    both = from_findings([finding("vanishing_gradient"), finding("saturation")], {"tanh"})
    assert len({c.name for c in both}) == len(both)  # no repeats


def test_autotrainer_order_is_the_published_one():
    assert [c.name for c in autotrainer_order([finding("vanishing_gradient")])] == [
        "activations -> SELU + lecun init", "activations -> ReLU + He init", "BatchNorm after each layer"]
    assert [c.name for c in autotrainer_order([finding("exploding_gradient")])] == [
        "activations -> SELU + lecun init", "activations -> ReLU", "clip value 1", "activations -> Tanh",
        "BatchNorm after each layer"]


def test_final_loss_is_robust_and_non_finite_is_inf():
    import numpy as np
    assert final_loss(np.array([5.0] * 90 + [1.0] * 9 + [100.0])) == 1.0
    assert final_loss(np.array([1.0, np.inf, np.nan])) == math.inf


def test_model_remedies_apply_in_place():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    apply_to_model(model, {"swap": {"from": "Sigmoid", "to": "LeakyReLU"}, "norm": "batch"})
    assert [type(m).__name__ for m in model] == ["Linear", "FeatureBatchNorm", "LeakyReLU", "Linear"]


def _steps(injector_spec, steps=5, lr=0.1, accumulate=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    injector = Injector(injector_spec, max_steps=None)
    injector.install_late()
    lrs = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(accumulate):
                model(torch.randn(16, 4)).pow(2).mean().mul(100).backward()
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
    finally:
        injector.remove()
    return model, lrs


def test_lr_scale_changes_the_step_but_not_what_the_script_sees():
    base, _ = _steps({})
    scaled, lrs = _steps({"lr_scale": 0.5})
    ref, _ = _steps({}, lr=0.05)
    assert lrs == [0.1] * 5  # the script (and its scheduler) still sees its own lr
    for a, b in zip(scaled.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(base[0].weight, scaled[0].weight)
    # gradients accumulated before the first step are not an update by hand: scaled once, by the step
    accumulated, _ = _steps({"lr_scale": 0.5}, lr=0.01, accumulate=3)
    ref, _ = _steps({}, lr=0.005, accumulate=3)
    for a, b in zip(accumulated.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def _train_scheduled(model: nn.Module, opt: torch.optim.Optimizer, sched, spec: dict, steps: int = 5) -> None:
    """A loop whose scheduler steps after every optimizer step, with the remedy `spec` injected."""
    injector = Injector(spec, max_steps=None)
    injector.install_late()
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
            sched.step()
    finally:
        injector.remove()


def test_norm_layers_a_remedy_adds_train_beside_a_scheduler():
    """The inserted norms' parameters join the script's optimizer; in a new param group OneCycleLR
    raised KeyError('initial_lr') at its next step, ending the trial after one step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_scheduled(model, opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10), {"norm": "batch"})
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2 and all(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_clip_remedy_clips_before_the_step():
    clipped, _ = _steps({"clip": "norm", "max_norm": 1e-3}, steps=1)
    start, _ = _steps({}, steps=0)
    moved = math.sqrt(sum((a - b).pow(2).sum().item() for a, b in zip(clipped.parameters(), start.parameters())))
    assert moved == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x the clipped norm


def test_adam_remedy_replaces_the_update():
    swapped, _ = _steps({"optimizer": "Adam", "lr": 1e-2}, steps=1)
    start, _ = _steps({}, steps=0)
    # Adam's first step moves every weight by lr·sign(g) (|m/sqrt(v)| = 1)
    delta = (swapped[0].weight - start[0].weight).abs()
    assert torch.allclose(delta[delta > 0], torch.full_like(delta[delta > 0], 1e-2), rtol=1e-3)


def test_recurrent_remedies():
    lstm = nn.LSTM(3, 4)
    with torch.no_grad():
        lstm.bias_hh_l0.fill_(-3.0)
    apply_to_model(lstm, {"recurrent": "forget_bias"})
    # the forget gate sees b_ih + b_hh: 1 in total, whatever b_hh held; other gates untouched
    assert torch.equal(lstm.bias_ih_l0[4:8] + lstm.bias_hh_l0[4:8], torch.ones(4))
    assert torch.equal(lstm.bias_hh_l0[:4], torch.full((4,), -3.0))
    # the code printed for the user does the same
    from gradwatch.fix.candidates import forget_bias
    printed = nn.LSTM(3, 4)
    exec(forget_bias().code, {"lstm": printed})
    assert torch.equal(printed.bias_ih_l0[4:8] + printed.bias_hh_l0[4:8], torch.ones(4))
    rnn = nn.RNN(3, 5)
    apply_to_model(rnn, {"recurrent": "orthogonal"})
    w = rnn.weight_hh_l0.detach()
    assert torch.allclose(w @ w.T, torch.eye(5), atol=1e-5)


def test_clipping_reaches_hand_written_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    injector = Injector({"clip": "norm", "max_norm": 1e-3}, max_steps=None)
    injector.install_late()
    try:
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(8, 4)).sum().mul(100).backward()
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
            with torch.no_grad():
                for p in model[1].parameters():  # a loop that updates only some layers is still by hand
                    p -= 0.1 * p.grad
    finally:
        injector.remove()
    assert float(norm) == pytest.approx(1e-3, rel=1e-4)  # clipped before the script applied it


def test_a_crashed_trial_never_wins():
    from pathlib import Path

    from gradwatch.fix import FixResult
    from gradwatch.fix.candidates import Candidate
    from gradwatch.fix.trial import Trial
    base = Trial(Candidate("baseline"), Path("."), 0, 1.0, steps=10, final_loss=2.0,
                 findings=[finding("exploding_gradient")])
    crashed = Trial(Candidate("crash"), Path("."), 1, 1.0, steps=0)
    assert FixResult(base, [crashed]).winner is None
    # a trial that went non-finite (and ended early, showing fewer findings) never wins either
    nan_base = Trial(Candidate("baseline"), Path("."), 0, 1.0, steps=10, final_loss=float("inf"),
                     findings=[finding("non_finite"), finding("dead_units")])
    cut_short = Trial(Candidate("nan"), Path("."), 0, 1.0, steps=4, final_loss=float("inf"),
                      findings=[finding("non_finite")])
    assert FixResult(nan_base, [cut_short]).winner is None
    finite = Trial(Candidate("ok"), Path("."), 0, 1.0, steps=10, final_loss=3.0,
                   findings=[finding("exploding_gradient"), finding("dead_units")])
    assert FixResult(nan_base, [cut_short, finite]).winner is finite
    # a remedy that made the script fail after a step (finite loss, no findings yet) never wins
    broke = Trial(Candidate("broke"), Path("."), 1, 1.0, steps=1, final_loss=0.5)
    assert FixResult(base, [broke]).winner is None and not broke.works


def test_a_remedy_that_breaks_the_training_function_is_a_failed_trial(tmp_path):
    from gradwatch.fix.candidates import norm

    def train():
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            if len(model) != 3:  # code that relies on the model's layout
                raise RuntimeError("unexpected layout")

    result = fix(train, out=tmp_path, budget_steps=10, candidates=[norm("batch")], strategy="all",
                 progress=lambda m: None)
    failed = result.trials[0]
    assert failed.failed and failed.steps == 1 and result.winner is None
    assert "unexpected layout" in (failed.run_dir / "output.log").read_text()


def test_budget_stops_the_script():
    with pytest.raises(SystemExit):
        _budget()


def _budget():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    injector = Injector({}, max_steps=3)
    injector.install_late()
    try:
        for step in range(10):
            opt.zero_grad()
            model(torch.randn(4, 2)).sum().backward()
            opt.step()
    finally:
        injector.remove()
        assert step == 2


def test_fix_repairs_an_exploding_script_end_to_end(tmp_path):
    result = gradwatch("fix", "--budget-steps", 100, "--out", tmp_path / "fix", SCRIPTS / "train_explode.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    baseline = json.loads((tmp_path / "fix" / "baseline" / "findings.json").read_text())
    assert {"exploding_gradient", "non_finite"} <= {f["kind"] for f in baseline}
    assert "repairs the run" in result.stdout
    winner = result.stdout.split("repairs the run")[0].splitlines()[-1]
    assert any(name in winner for name in ("clip", "ZClip", "learning rate x0.1", "Adam"))
    assert "final loss" in (tmp_path / "fix" / "baseline" / "output.log").read_text()  # script output kept apart
    # the change, in the script's names (its optimizer is `opt`), pasted where it says, repairs the script itself
    change = json.loads((tmp_path / "fix" / "fix.json").read_text())["code"]
    code = "\n".join(line.split("#")[0] for line in change.splitlines())
    assert re.search(r"(?<![\w.])opt\b", code) and not re.search(r"(?<![\w.])optimizer\b", code), change
    script = (SCRIPTS / "train_explode.py").read_text()
    change = change.replace("# batch: one input batch", "batch = torch.randn(64, 16)  # one input batch")
    if "before opt.step()" in change:  # in the loop
        pasted = script.replace("    opt.step()", textwrap.indent(change, "    ") + "\n    opt.step()")
    else:  # once the optimizer is built
        built = "opt = torch.optim.SGD(model.parameters(), lr=0.1)"
        pasted = script.replace(built, built + "\n" + change)
    (tmp_path / "pasted.py").write_text(pasted)
    ran = subprocess.run([sys.executable, tmp_path / "pasted.py"], capture_output=True, text=True)
    assert ran.returncode == 0 and math.isfinite(float(ran.stdout.split("final loss")[1])), ran.stderr


def test_fix_in_process_with_a_function(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "kept.txt").write_text("input")
    (work / "log.txt").write_text("the user's own log\n")
    monkeypatch.chdir(work)

    def train():
        import os
        if os.path.exists("ckpt.pt"):  # as a script that resumes would: this trial must start fresh
            raise RuntimeError("a trial started from another trial's checkpoint")
        with open("log.txt", "a") as log:
            log.write("a trial ran\n")
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        x = torch.randn(64, 16)
        for step in range(40):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
            if step == 5:
                torch.save(model.state_dict(), "ckpt.pt")  # the script's own output, written by every trial

    import gradwatch as gw
    stale, foreign = tmp_path / "fix" / "screen-9", tmp_path / "fix" / "trial-7"  # an earlier fix's; not ours
    stale.mkdir(parents=True), foreign.mkdir()
    (stale / "remedy.json").write_text("{}"), (foreign / "notes.txt").write_text("mine")
    result = gw.fix(train, out=tmp_path / "fix", budget_steps=40, progress=lambda m: None)  # the documented call
    assert result.baseline.harmful and result.repaired
    assert not result.winner.harmful and result.winner.final_loss < 1e3
    assert not stale.exists() and (foreign / "notes.txt").exists()
    for t in [*result.screened, *result.trials]:  # each directory says which remedy it ran
        assert json.loads((t.run_dir / "remedy.json").read_text())["spec"] == t.candidate.spec
    summary = json.loads((tmp_path / "fix" / "fix.json").read_text())  # what a Ctrl-C would have kept
    assert summary["winner"] == result.winner.candidate.name and summary["repaired"]
    assert not any(t.failed for t in [*result.screened, *result.trials])
    assert result.written == ["ckpt.pt", "log.txt"] == summary["written_by_the_script"]  # the input left alone is not listed
    assert not (work / "ckpt.pt").exists() and (work / "log.txt").read_text() == "the user's own log\n"
    assert all((t.run_dir / "written" / "ckpt.pt").is_file() for t in [result.baseline, *result.trials])
    assert not (tmp_path / "fix" / ".originals").exists()
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result
    console = Console(record=True, width=200)
    print_result(result, console)
    assert "your script wrote or deleted ckpt.pt, log.txt during the trials. Your directory was put back" in console.export_text()
    assert [r["remedy"] for r in summary["screened"]] == [t.candidate.name for t in result.screened]


def test_bad_budget_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="budget_steps=0"):
        fix(["python", "x.py"], out=tmp_path, budget_steps=0)
    import argparse

    from gradwatch.cli import fix_cmd  # the CLI names the option as typed, and starts nothing
    parser = argparse.ArgumentParser()
    fix_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["fix", "--budget-steps", "-5", "--", "python", "x.py"])
    with pytest.raises(ConfigError, match="--budget-steps -5: expected a whole number >= 1"):
        args.func(args)
    assert not (tmp_path / "runs").exists()


def test_a_script_that_fails_at_once_is_named_with_its_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("import torch\nimport no_such_module_here\n")
    with pytest.raises(ConfigError, match="(?s)no training step.*No module named 'no_such_module_here'"):
        fix([sys.executable, "broken.py"], out=tmp_path / "fix", budget_steps=5, progress=lambda m: None)


def test_combining_remedies_that_touch_different_things():
    from gradwatch.fix.candidates import adam, clip_norm, combine, lr_scale, reinit
    both = combine(reinit(), adam())
    assert both.spec == {"init": "auto", "optimizer": "Adam", "lr": 1e-3} and "gw.init_" in both.code
    assert combine(adam(), lr_scale(0.1)) is None  # Adam sets its own step: an lr scale would be void
    assert combine(clip_norm(1.0), clip_norm(2.0)) is None


def _line_of_this_file(text: str) -> int:
    return next(i for i, line in enumerate(open(__file__).read().splitlines(), 1) if text in line and "_line_of" not in line)


def test_a_nan_in_the_data_is_named_and_only_its_remedy_tried(tmp_path, monkeypatch):
    """A NaN from a batch, not from training dynamics: fix says where it came in, and tries only
    setting it to 0 where the model takes it (no lr, clip or optimizer reaches the data); the trial
    trains as the printed `torch.nan_to_num` on the batch does, bit for bit."""
    from gradwatch.cli.fix_cmd import nan_note

    def train(mend=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x, y = torch.randn(30, 32, 8), torch.randn(30, 32, 1)
        x[12, 3, 0] = float("nan")  # one bad row in batch 12
        for i in range(30):
            opt.zero_grad()
            batch = torch.nan_to_num(x[i], nan=0.0, posinf=0.0, neginf=0.0) if mend else x[i]
            nn.functional.mse_loss(model(batch), y[i]).backward()
            opt.step()
        torch.save(model.state_dict(), "weights.pt")

    monkeypatch.chdir(tmp_path)
    result = fix(train, out=tmp_path / "fix", budget_steps=40, progress=lambda m: None)
    assert "non_finite" in result.baseline.harmful and result.repaired and not result.screened
    assert [t.candidate.spec["inputs"][1:] for t in result.trials] == [[__file__, _line_of_this_file("if mend else x[i]"),
                                                                       "NaN"]]
    assert "torch.nan_to_num(..., nan=0.0, posinf=float('inf'), neginf=float('-inf')) there" in result.winner.candidate.code
    assert "The winner sets it to 0" in nan_note(result)
    train(mend=True)
    trained, mended = torch.load(result.winner.run_dir / "written" / "weights.pt"), torch.load("weights.pt")
    assert all(torch.equal(trained[k], mended[k]) for k in mended)
    result.trials.clear()  # not repaired: where to look
    # the baseline again to step 12 found the batch holding the NaN, and the line that took it
    assert result.located.steps == 13 and result.origin is not None and not result.origin.made_here
    assert result.origin.file == __file__ and "else x[i]" in result.origin.code
    hint = nan_note(result)
    assert hint is not None and "step 12" in hint and "else x[i]" in hint
    result.origin = None  # not found (a script whose NaN moves between runs): where to look
    assert "data or the loss" in nan_note(result)
    exploding = Trial(Candidate("b"), tmp_path, 0, 1.0, steps=10, findings=[
        Finding("non_finite", "error", 40, (), "m", {"grad_growth_before": 1e6, "first_seen_in": "gradients"})])
    assert nan_note(FixResult(exploding, [])) is None  # growth led up to it: a training fault


def _screened(*rows: tuple) -> list[Trial]:
    """Screening trials, best first, from (candidate, loss, harmful kinds left)."""
    return [Trial(c, None, 0, 0.1, steps=10, final_loss=loss, findings=[finding(k) for k in kinds])
            for c, loss, kinds in rows]


def test_finals_pair_the_leader_with_the_next_two():
    from gradwatch.fix import pick_finals
    from gradwatch.fix.candidates import adam, clip_norm, lr_scale, reinit, swap
    names = lambda cs: [c.name for c in cs]
    dead = ("dead_units",)
    assert names(pick_finals(_screened((reinit(), 1.0, dead), (adam(), 2.0, dead), (clip_norm(1.0), 3.0, dead)))) == [
        "re-initialise per activation + Adam (lr 1e-3)", "re-initialise per activation + clip norm 1"]
    # two activation swaps overrule each other: the leader alone, then the leader with the third
    selu, leaky = swap("*", "SELU", "lecun"), swap("Sigmoid", "LeakyReLU", "auto")
    assert names(pick_finals(_screened((selu, 1.0, dead), (leaky, 2.0, dead), (adam(), 3.0, dead)))) == [
        selu.name, f"{selu.name} + Adam (lr 1e-3)"]
    # Adam sets its own step, so no lr scale beside it: each alone
    assert names(pick_finals(_screened((adam(), 1.0, dead), (lr_scale(0.1), 2.0, dead)))) == [
        "Adam (lr 1e-3)", "learning rate x0.1"]


def test_a_leader_that_repairs_runs_alone_and_only_beside_a_close_repair(tmp_path, monkeypatch):
    """A tester's dead-ReLU net: ReLU -> LeakyReLU + He left no harmful finding in screening (0.565),
    lr x0.1 left dead units (1.343). The finals were the pair and lr x0.1 alone; the pair "worked",
    so it was printed, and the leader alone (0.158 against the pair's 1.009) never ran."""
    import importlib

    from gradwatch.fix import pick_finals
    from gradwatch.fix.candidates import adam, clip_norm, lr_scale, orthogonal, reinit, swap
    fix_module = importlib.import_module("gradwatch.fix")  # the package (gradwatch.fix is the function)
    names = lambda cs: [c.name for c in cs]
    leaky, lower = swap("ReLU", "LeakyReLU", "auto"), lr_scale(0.1)

    def train():  # the baseline, far from its target (loss ~100)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        for _ in range(12):
            opt.zero_grad()
            (model(torch.randn(8, 4)) - 10).pow(2).mean().backward()
            opt.step()

    full = {leaky.name: (0.158, ()), f"{leaky.name} + {lower.name}": (1.009, ()), lower.name: (1.256, ("dead_units",))}
    real = fix_module.run_trial_in_process

    def trial(command, run_dir, cand, steps, trained=None, locate_at=None):  # as measured by the tester
        if cand is fix_module.BASELINE:
            return real(command, run_dir, cand, steps, trained=trained)
        loss, kinds = full[cand.name] if steps == 40 else (0.565, ()) if cand is leaky else (1.343, ("dead_units",))
        return Trial(cand, run_dir, 0, 0.1, steps=steps, final_loss=loss, findings=[finding(k) for k in kinds])

    monkeypatch.setattr(fix_module, "run_trial_in_process", trial)
    result = fix(train, out=tmp_path, budget_steps=40, candidates=[leaky, lower], progress=lambda m: None)
    assert names(t.candidate for t in result.trials) == [leaky.name]  # one full trial, not two
    assert result.winner.candidate.name == leaky.name and result.repaired
    # a runner-up that left a harmful finding is not paired with a leader that left none
    assert names(pick_finals(_screened((leaky, 0.565, ()), (lower, 1.343, ("dead_units",))))) == [leaky.name]
    # beside another repair screened close to it: the leader alone, then the two together
    assert names(pick_finals(_screened((leaky, 0.5, ()), (adam(), 0.9, ()), (lower, 1.3, ("dead_units",))))) == [
        leaky.name, f"{leaky.name} + Adam (lr 1e-3)"]
    # one far behind it is not paired; one that overrules it runs alone; a negative loss keeps its scale
    assert names(pick_finals(_screened((leaky, 0.5, ()), (adam(), 1.2, ())))) == [leaky.name]
    assert names(pick_finals(_screened((adam(), 0.5, ()), (lower, 0.6, ()), (reinit(), 0.7, ())))) == [
        "Adam (lr 1e-3)", "learning rate x0.1"]
    assert names(pick_finals(_screened((leaky, -2.0, ()), (clip_norm(1.0), -1.5, ())))) == [
        leaky.name, f"{leaky.name} + clip norm 1"]
    # the leader with Adam on top, screened behind it: Adam did not help it; the next repair pairs
    from gradwatch.fix.candidates import combine, norm
    batch = norm("batch")
    assert names(pick_finals(_screened((batch, 1.26, ()), (combine(batch, adam()), 1.45, ()), (leaky, 1.49, ())))) == [
        batch.name, f"{batch.name} + {leaky.name}"]
    # a vanilla RNN: orthogonal W_hh alone repaired it, its pairs did not: it is a final alone
    lead = orthogonal()
    assert names(pick_finals(_screened((lead, 0.1, ()), (lr_scale(10.0), 0.5, ("vanishing_gradient",)),
                                       (adam(), 0.6, ("vanishing_gradient",))))) == [lead.name]


def _steps_until_exit(spec: dict) -> int:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    injector = Injector(spec, max_steps=None)
    injector.install_late()
    step = -1
    try:
        for step in range(12):
            opt.zero_grad()
            loss = model(torch.randn(4, 2)).sum()
            (loss * float("nan") if step >= 5 else loss).backward()  # non-finite from step 5 on
            opt.step()
    except SystemExit:
        pass
    finally:
        injector.remove()
    return step


def test_a_remedy_trial_stops_once_its_loss_stays_non_finite():
    from gradwatch.fix.inject import STOP_AFTER_NON_FINITE
    # steps 5, 6, 7 are non-finite and recorded; the backward of step 8 ends the trial
    assert _steps_until_exit({"lr_scale": 0.5}) == 5 + STOP_AFTER_NON_FINITE
    assert _steps_until_exit({}) == 11  # the baseline (no remedy) runs its whole course


def test_the_printed_code_of_every_candidate_runs():
    """What fix prints is what the user pastes: each snippet must run as written."""
    import gradwatch as gw
    kinds = [finding("exploding_gradient", baseline_norm=2.0, at_init=True), finding("vanishing_gradient"),
             finding("dead_units"), finding("loss_plateau"), finding("non_finite")]
    through_time = Finding("vanishing_gradient", "warning", 0, ("rnn",), "m", {"sequence_length": 30})
    cands = {c.name: c for c in [
        *from_findings(kinds, {"sigmoid", "relu"}, layer_types={"Linear"}, optimizer="SGD"),
        *from_findings([through_time], set(), layer_types={"RNN", "LSTM"}, optimizer="SGD"),
        *from_findings([finding("exploding_gradient")], set()),  # no measured level: ZClip
        *from_findings([finding("exploding_gradient", baseline_norm=2.0)], set()),  # clip norm 4
        *from_findings([finding("exploding_gradient")], set(), lr_ceiling=0.05),  # a ceiling on the schedule
        *autotrainer_order(kinds)]}.values()
    assert len(cands) >= 15
    for cand in cands:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        ns = {"gw": gw, "nn": nn, "torch": torch, "model": model, "lstm": nn.LSTM(3, 4), "rnn": nn.RNN(3, 4),
              "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "batch": torch.randn(2, 4)}
        model(torch.randn(2, 4)).sum().backward()
        exec(cand.code, ns)  # raises if the snippet is broken
        assert torch.isfinite(ns["model"](torch.randn(2, 4))).all(), cand.name


def test_the_remedy_goes_to_the_model_trained_not_a_teacher_run_under_no_grad():
    """A fixed teacher makes the targets under no_grad before the student's first forward: the
    swap must change the student (trained), not the teacher (only evaluated)."""
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    student = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))
    injector = Injector({"swap": {"from": "Sigmoid", "to": "LeakyReLU"}}, max_steps=None)
    try:
        x = torch.randn(16, 4)
        with torch.no_grad():
            y = teacher(x)
        nn.functional.mse_loss(student(x), y).backward()
    finally:
        injector.remove()
    assert injector.model is student
    assert isinstance(teacher[1], nn.Sigmoid) and isinstance(student[1], nn.LeakyReLU)


def test_fix_in_process_refuses_a_model_built_outside_the_function(tmp_path):
    """Every trial would start from the weights (and the changes) of the one before."""
    import gradwatch as gw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 1))

    def train():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(32, 8)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x[:, :1]).backward()
            opt.step()

    with pytest.raises(ConfigError, match="build the model and its optimizer inside train_fn"):
        gw.fix(train, out=tmp_path / "fix", budget_steps=20, progress=lambda m: None,
               candidates=[swap("Sigmoid", "LeakyReLU", "auto"), lr_scale(0.1)])
    assert isinstance(model[1], nn.Sigmoid)  # refused before the remedy touched it


def test_fix_refuses_a_run_that_changes_no_weight(tmp_path):
    """backward() without optimizer.step(): no remedy can act, and the budget (counted in steps)
    would never end a trial."""
    import gradwatch as gw

    def train():
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()

    with pytest.raises(ConfigError, match=r"no loss.backward\(\) \(outside torch.no_grad\(\)\) followed by "
                                          r"optimizer.step\(\) or an update of the weights by hand"):
        gw.fix(train, out=tmp_path / "fix", budget_steps=5, progress=lambda m: None)


def test_fix_refuses_a_run_that_never_calls_backward(tmp_path):
    """A script that only evaluates (or computes a loss it never backpropagates) ends cleanly with no
    training step: said so, not as a bare exit code 0."""
    import gradwatch as gw

    def train():
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            model(torch.randn(4, 8)).pow(2).mean().item()

    with pytest.raises(ConfigError, match=r"no training step \(it ran to its end without one: no loss.backward\(\)"):
        gw.fix(train, out=tmp_path / "fix", budget_steps=5, progress=lambda m: None)


def test_the_change_from_the_baseline_reads_right():
    from gradwatch.cli.fix_cmd import _versus
    assert _versus(117.3, 0.197) == "x0.0017"  # not "-100%"
    assert _versus(0.04028, 0.0402) == "-0.2%"  # not "-0%"
    assert _versus(2.3, 0.27) == "-88%" and _versus(1.0, 3.0) == "+200%"
    assert _versus(float("inf"), 1.0) == "finite (was not)" and _versus(0.0, 1.0) == ""
    assert _versus(1.0, float("inf")) == ""  # the trial's own column says it went non-finite


def test_a_killed_fix_is_put_right_by_the_next_one(tmp_path, monkeypatch):
    """SIGKILL ends fix with the directory in a trial's state: the next fix puts it back from the
    copy the killed one took (its new files aside), keeps that copy and says so; a second kill
    never replaces the oldest copy."""
    from gradwatch.fix.touched import Workspace

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "fix"
    (tmp_path / "notes.txt").write_text("mine")
    Workspace(tmp_path, out)  # taken, never closed: killed during a trial that then ...
    (tmp_path / "notes.txt").write_text("a trial's")  # ... changed a file
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "last.pt").write_text("a trial's checkpoint")  # ... and wrote one
    again = Workspace(tmp_path, out)
    assert "killed before it put your files back" in again.notice
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "ckpt" / "last.pt").exists()
    kept = out / ".originals-interrupted"
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "created" / "ckpt" / "last.pt").is_file()
    (tmp_path / "notes.txt").write_text("a later trial's")  # killed again
    third = Workspace(tmp_path, out)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (kept / "notes.txt").read_text() == "mine"
    third.close()
    assert not (out / ".originals").exists()


def test_the_working_directory_is_put_back_three_levels_deep_with_links_and_folders(tmp_path):
    """checkpoints/run1/ckpt.pt, a 'latest' symlink and the folders a trial made all go; a user's
    symlink is put back as a link; an interrupted put-back keeps the copy for the next fix."""
    import os

    from gradwatch.fix.touched import Workspace

    out = tmp_path / "runs" / "fix"
    (tmp_path / "target.txt").write_text("t")
    os.symlink("target.txt", tmp_path / "link.txt")
    w = Workspace(tmp_path, out)
    (tmp_path / "checkpoints" / "run1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "run1" / "ckpt.pt").write_text("x")
    os.symlink("checkpoints/run1/ckpt.pt", tmp_path / "latest.pt")
    (tmp_path / "link.txt").unlink()
    os.symlink("elsewhere", tmp_path / "link.txt")
    w.settle(out / "trial-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "runs", "target.txt"]
    assert os.readlink(tmp_path / "link.txt") == "target.txt"
    assert (out / "trial-1" / "written" / "checkpoints" / "run1" / "ckpt.pt").read_text() == "x"
    w.settled = False  # a second Ctrl-C during a put-back
    w.close()
    assert (out / ".originals" / "target.txt").is_file()


def test_a_working_directory_inside_out_is_said_to_be_unprotected(tmp_path):
    from gradwatch.fix.touched import Workspace

    w = Workspace(tmp_path, tmp_path)
    assert "inside --out" in w.notice
    w.close()


def test_a_script_that_fails_partway_is_no_repair(tmp_path, monkeypatch):
    """A script that crashes at step 12 in every trial: the crash is said, no remedy 'repairs' it
    (before, exit codes were compared with the baseline's, so a baseline that failed hid them).
    Given as `-- script.py`, it runs as `python script.py`."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result
    from gradwatch.fix.candidates import clip_norm
    from gradwatch.runner import command_from_target

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "crash_mid.py"
    script.write_text((SCRIPTS / "train_sigmoid.py").read_text().replace(
        "    opt.step()", "    opt.step()\n    if _ == 11:\n        raise RuntimeError('a bug at step 12')"))
    command = command_from_target(["--", "crash_mid.py"], None)
    assert command == [sys.executable, "crash_mid.py"]
    result = fix(command, out=tmp_path / "fix", budget_steps=40, candidates=[lr_scale(0.1), clip_norm(1.0)],
                 progress=lambda m: None)
    summary = json.loads((tmp_path / "fix" / "fix.json").read_text())
    assert summary["baseline"]["failed"] and summary["baseline"]["steps"] == 12
    assert summary["winner"] is None and not summary["repaired"]
    assert summary["trials"] and all(t["failed"] for t in summary["trials"])
    console = Console(record=True, width=200)
    print_result(result, console)
    out = " ".join(console.export_text().split())
    assert "fails on its own: the baseline exited with code 1 after 12 steps (RuntimeError: a bug at step 12)" in out
    assert "Every trial failed as the baseline did" in out and "repairs the run" not in out
    # a baseline that failed says nothing of the script's length (a remedy may run past its step
    # 12): screened for a quarter of the budget, not in full
    assert "remedies, 10 steps each" in out and "in full" not in out


def _context(lr: list[float], layers=(), optimizer="SGD"):
    """The facts of a baseline run the printed code depends on, hand-built."""
    import numpy as np

    from gradwatch.diagnose.advice import Context
    from gradwatch.store.series import RunSeries
    return Context(RunSeries(list(layers), np.arange(len(lr)), np.ones(len(lr)), np.array(lr), {},
                             meta={"optimizer": optimizer}))


TRAINER = '''
import torch
from torch import nn


class Trainer:
    def __init__(self, model, lr=2.0):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        # BUILT

    def step(self, xb):
        self.optimizer.zero_grad()
        self.model(xb).pow(2).mean().backward()
        # BEFORE STEP
        self.optimizer.step()


trainer = Trainer(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)))
trainer.step(torch.randn(16, 4))
'''


def _pasted(script: str, change: str, where: str) -> dict:
    """`script` run with `change` pasted at the comment `where`, indented as the comment is."""
    line = next(l for l in script.splitlines() if l.strip() == f"# {where}")
    ns: dict = {"__name__": "__main__"}
    exec(script.replace(line, textwrap.indent(change, line[:len(line) - len(line.lstrip())])), ns)
    return ns


def test_the_printed_code_uses_the_scripts_own_names():
    """Pasted into the script, the change must run and act: before, it named `model` and
    `optimizer` (a NameError in a Trainer class; a new `optimizer` the script never used)."""
    from gradwatch.fix.candidates import adam, clip_norm, lr_scale, orthogonal, reinit
    from gradwatch.fix.names import read_names
    from gradwatch.store.series import LayerInfo

    names = read_names(TRAINER, _context([2.0, 2.0]))
    assert (names.model, names.optimizer, names.batch) == ("self.model", "self.optimizer", "xb")
    lowered = names.complete(lr_scale(0.1, names).code)
    assert "group['lr'] = 0.2" in lowered  # the value, not "*= 0.1"
    assert _pasted(TRAINER, lowered, "BUILT")["trainer"].optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert isinstance(_pasted(TRAINER, names.complete(adam(names).code), "BUILT")["trainer"].optimizer,
                      torch.optim.Adam)
    clipped = _pasted(TRAINER.replace("trainer.step", "trainer.model[0].weight.grad = None\ntrainer.step"),
                      names.complete(clip_norm(1e-3, names).code), "BUILT")["trainer"]
    assert float(torch.cat([p.grad.flatten() for p in clipped.model.parameters()]).norm()) == pytest.approx(1e-3, rel=1e-3)
    init = names.complete(reinit(names).code)
    assert init.startswith("import gradwatch as gw\n# batch: one input batch, as in self.model(xb)")
    _pasted(TRAINER, "batch = torch.randn(2, 4)\n" + init, "BUILT")  # once, before training, as the comment says
    # a module inside the model is reached through the script's model, by its recorded name
    rnn = read_names("net = Net()\nopt = torch.optim.SGD(net.parameters(), lr=0.1)\n",
                     _context([0.1], [LayerInfo("enc.rnn", "RNN", 0, "recurrent")]))
    assert "net.enc.rnn.named_parameters()" in orthogonal(rnn).code
    # two optimizers (a GAN's): each clipped, as the trial clips each (tests/test_fix_gan.py)
    gan = read_names("import torch\ng_opt = torch.optim.Adam(g.parameters())\nd_opt = torch.optim.Adam(d.parameters())\n",
                     _context([1e-3], optimizer="Adam"))
    assert gan.complete(clip_norm(1.0, gan).code).splitlines() == [
        "import gradwatch as gw",
        "gw.clip.attach(g_opt, gw.clip.ClipNorm(1))  # once, after g_opt is built: clips before every g_opt.step()",
        "gw.clip.attach(d_opt, gw.clip.ClipNorm(1))  # once, after d_opt is built: clips before every d_opt.step()"]


FACTORY = '''
import torch
from torch import nn


def make_optimizer(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = make_optimizer(net, lr=2.0)
# BUILT
net(torch.randn(16, 4)).pow(2).mean().backward()
opt.step()
'''


def test_an_optimizer_built_by_a_function_of_the_script_is_named():
    """A tester's script built its optimizer in `make_optimizer(model, lr)`: the change said
    `optimizer`, "not found in your script", and pasted in, it raised a NameError."""
    from gradwatch.fix.candidates import lr_scale
    from gradwatch.fix.names import read_names

    names = read_names(FACTORY, _context([2.0]))
    assert (names.model, names.optimizer, names.found) == ("net", "opt", {"model", "optimizer"})
    change = names.complete(lr_scale(0.1, names).code)
    assert "not found" not in change
    assert _pasted(FACTORY, change, "BUILT")["opt"].param_groups[0]["lr"] == pytest.approx(0.2)
    # built in a variable and returned, the model passed by keyword: the same
    local = FACTORY.replace("    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)",
                            "    o = torch.optim.SGD(model.parameters(), lr=lr)\n    return o")
    assert read_names(local.replace("make_optimizer(net, lr=2.0)", "make_optimizer(model=net)")).model == "net"


LIGHTNING_SCRIPT = '''
class Net(L.LightningModule):
    def training_step(self, batch, i):
        return self.net(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
'''


def test_a_lightning_script_is_told_where_its_optimizer_is_built():
    """A LightningModule's optimizer is built in configure_optimizers, which Lightning calls: the
    change said "optimizer: its optimizer (not found in your script)", with nowhere to put it."""
    from gradwatch.fix.candidates import adam, lr_scale
    from gradwatch.fix.names import read_names

    change = read_names(LIGHTNING_SCRIPT).complete(adam(read_names(LIGHTNING_SCRIPT)).code)
    assert "optimizer: the one your configure_optimizers returns: make the change there" in change
    assert "model: your LightningModule" in change
    hf = "args = TrainingArguments(output_dir='out', learning_rate=3e-2)\ntrainer = Trainer(model=model, args=args)\n"
    change = read_names(hf).complete(lr_scale(0.1, read_names(hf)).code)  # (pasted, optimizer was None)
    assert "optimizer: the Trainer's, built inside train(): give the lr as TrainingArguments(learning_rate=...)" in change
    seq2seq = hf.replace("TrainingArguments", "Seq2SeqTrainingArguments").replace("Trainer(", "Seq2SeqTrainer(")
    assert read_names(seq2seq).hf_trainer and read_names("cfg = SFTConfig(lr=1)\nt = SFTTrainer(m, cfg)\n").hf_trainer
    assert not read_names("cfg = BertConfig(hidden_size=32)\nmodel = Bert(cfg)\n").hf_trainer  # (no Trainer)
    plain = LIGHTNING_SCRIPT.replace("configure_optimizers", "make_optimizer")
    assert "optimizer: its optimizer (not found" in read_names(plain).complete(adam(read_names(plain)).code)


def test_a_script_that_calls_something_batch_gets_another_name_for_the_example_input():
    """A tester's script has `def batch(n=64)`: the printed `example_input=batch` passed the function,
    and gw.init_ raised ConfigError when pasted."""
    from gradwatch.fix.candidates import swap
    from gradwatch.fix.names import read_names

    source = "def batch(n=64):\n    return torch.randn(n, 4)\nmodel = make()\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
    names = read_names(source)
    change = names.complete(swap("Sigmoid", "LeakyReLU", "auto", names=names).code)
    assert "example_input=one_batch" in change and "# one_batch: one input batch" in change
    assert "example_input=batch)" not in change
    plain = read_names(source.replace("def batch(n=64)", "def make_batch(n=64)"))
    assert "example_input=batch" in plain.complete(swap("Sigmoid", "LeakyReLU", "auto", names=plain).code)


def test_the_names_come_from_the_command_or_the_training_function(tmp_path):
    from gradwatch.fix.names import script_names, script_path
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "train.py").write_text("net = make()\nopt = torch.optim.SGD(net.parameters(), lr=0.1)\n")
    assert script_path([sys.executable, "-u", "-m", "pkg.train", "--epochs", "3"], tmp_path) == tmp_path / "pkg" / "train.py"
    assert script_path([sys.executable, "-W", "ignore", "pkg/train.py"], tmp_path) == tmp_path / "pkg" / "train.py"
    assert script_path(["bash", "run.sh"], tmp_path) is None

    def train():
        net = nn.Linear(2, 1)
        sgd = torch.optim.SGD(net.parameters(), lr=0.1)
        net(torch.randn(4, 2)).sum().backward()
        sgd.step()

    names = script_names(train)
    assert (names.model, names.optimizer, names.batch) == ("net", "sgd", "torch.randn(4, 2)")
    assert "nn" in names.imported and "gw" not in names.imported  # this module's globals


def test_an_import_under_an_if_is_not_taken_as_made_but_one_under_the_main_guard_is():
    """A script that imports gradwatch only `if args.watch:` was printed no `import gradwatch as gw`."""
    from gradwatch.fix.candidates import clip_norm
    from gradwatch.fix.names import read_names

    body = "model = Net()\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
    conditional = read_names("import torch\nif args.watch:\n    import gradwatch as gw\n" + body)
    assert "gw" not in conditional.imported and "torch" in conditional.imported
    assert conditional.complete(clip_norm(1.0, conditional).code).startswith("import gradwatch as gw\n")
    guarded = read_names("if __name__ == '__main__':\n    import torch\n    import gradwatch as gw\n"
                         + "".join("    " + line + "\n" for line in body.splitlines()))
    assert {"gw", "torch"} <= guarded.imported
    assert not guarded.complete(clip_norm(1.0, guarded).code).startswith("import gradwatch")


def test_a_model_change_is_said_to_go_after_the_scripts_own_initialisation():
    """Pasted right after the model is built, the script's own `nn.init.normal_` loop then undid the
    change's initialisation (a user's SELU CNN: loss 229, against the trial's repair)."""
    from gradwatch.fix.candidates import reinit
    from gradwatch.fix.names import read_names

    source = ("import torch\nfrom torch import nn\nmodel = Net()\nfor m in model.modules():\n"
              "    nn.init.normal_(m.weight, 0, 1)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n")
    names = read_names(source)
    assert names.initialised_at == 5 and "(line 5), before training" in names.complete(reinit(names).code)
    applied = read_names(source.replace("    nn.init.normal_(m.weight, 0, 1)", "    pass") + "model.apply(init_weights)\n")
    assert applied.initialised_at == 7
    custom_function = read_names(source.replace("    nn.init.normal_(m.weight, 0, 1)", "    y = Clamp.apply(x)"))
    assert custom_function.initialised_at == 0 and "own initialisation" not in custom_function.complete(reinit(names).code)
    # a reviewer's shapes: a fill in place over the parameters, a function imported by name, and calls
    # inside the function or the class that only define the init
    filled = read_names("import torch\nmodel = Net()\nfor p in model.parameters():\n    p.data.normal_(0, 1)\n")
    by_name = read_names("from torch.nn.init import kaiming_normal_\nmodel = Net()\nkaiming_normal_(model.fc.weight)\n")
    defined = read_names("import torch\nfrom torch import nn\ndef main():\n    model = Net()\n    model.apply(init_weights)\n"
                         "def init_weights(m):\n    nn.init.normal_(m.weight)\nclass Net(nn.Module):\n"
                         "    def __init__(self):\n        nn.init.zeros_(self.w)\n")
    noise = read_names("import torch\nz = torch.empty(4, 8).normal_()\n")
    cleared = read_names("import torch\nmodel = Net()\nfor p in model.parameters():\n    p.grad.zero_()\n"
                         "    p.grad.data.zero_()\n")
    assert (filled.initialised_at, by_name.initialised_at, defined.initialised_at, noise.initialised_at,
            cleared.initialised_at) == (4, 3, 5, 0, 0)


NO_OPTIMIZER = """
import torch
from torch import nn
m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
X = torch.randn(100, 16)
lr = 0.5
for i in range(3):
    loss = m(X).pow(2).mean()
    m.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= lr * p.grad
"""


def test_the_printed_code_for_hand_written_updates_names_no_optimizer():
    """A script that updates its weights itself (`p -= lr * p.grad`): the lr and clipping changes
    named an `optimizer` it does not have (a NameError). They act where the trial acted: on the lr
    the update multiplies the gradients by, and on the gradients after the backward."""
    import gradwatch as gw
    from gradwatch.fix.candidates import Names, clip_norm, clip_value, combine, lr_scale, zclip
    from gradwatch.fix.names import read_names

    manual = _context([float("nan")] * 3, optimizer=None)
    found = read_names(NO_OPTIMIZER, manual)
    explode = [finding("exploding_gradient"), finding("non_finite")]
    for names, model in ((Names(run=manual), "model"), (found, "m")):  # generic, and read from the script
        cands = [*from_findings(explode, {"relu"}, optimizer=None, names=names), clip_norm(1e-3, names),
                 clip_value(1e-4, names), combine(lr_scale(0.1, names), zclip(names))]
        assert {"learning rate x0.1", "ZClip"} <= {c.name for c in cands}
        for cand in cands:
            code = names.complete(cand.code)
            assert not re.search(r"\boptimizer\b", code), code
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            net(torch.randn(16, 4)).pow(2).sum().mul(100).backward()
            ns = {"torch": torch, "nn": nn, "gw": gw, model: net, "lr": 0.5}
            exec(code, ns)  # raises if the snippet is broken
            norm = float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())
            assert ns["lr"] == pytest.approx(0.05 if "learning rate" in cand.name else 0.5), cand.name
            if cand.name == "clip norm 0.001":
                assert norm == pytest.approx(1e-3, rel=1e-3)
            if cand.name == "clip value 0.0001":
                assert max(float(p.grad.abs().max()) for p in net.parameters()) <= 1e-4
    assert (found.model, found.update_lr, found.update_lr_set, found.batch) == ("m", "lr", 0.5, "X")
    assert read_names(NO_OPTIMIZER.replace("lr = 0.5", "lr = float(sys.argv[1])"), manual).update_lr_set is None
    assert lr_scale(0.1, read_names(NO_OPTIMIZER.replace("lr *", "0.5 *"), manual)).code.startswith("# multiply")


GROUPS = """
import torch
from torch import nn
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                             {"params": model[2].parameters(), "lr": 1.5}], momentum=0.9)
# BUILT
"""


def test_the_printed_lr_change_keeps_each_groups_own_lr(tmp_path):
    """Parameter groups at 0.05 and 1.5: the trial scaled each (the head ran at 0.15), but the code
    set every group to 0.005 (group 0's x0.1)."""
    from gradwatch.fix import group_lrs
    from gradwatch.fix.names import read_names
    from gradwatch.fix.trial import run_trial_in_process

    def train():
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                                     {"params": model[2].parameters(), "lr": 1.5}])
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()

    recorded = group_lrs(run_trial_in_process(train, tmp_path / "run", Candidate("b"), 3).run_dir)
    assert recorded == (0.05, 1.5)
    names = dataclasses.replace(read_names(GROUPS, _context([0.05] * 3)), group_lrs=recorded)
    code = names.complete(lr_scale(0.1, names).code)
    assert "group['lr'] *= 0.1" in code and "0.05 -> 0.005, 1.5 -> 0.15" in code
    scaled = _pasted(GROUPS, code, "BUILT")["optimizer"]
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx([0.005, 0.15])
    # groups that share one lr: the value, as before
    same = dataclasses.replace(names, group_lrs=(0.05, 0.05))
    assert "group['lr'] = 0.005" in lr_scale(0.1, same).code
    # a script that loads its optimizer's state: each group's value, not a factor compounding at every resume
    resumed = dataclasses.replace(names, loaded=frozenset({"optimizer"}))
    code = names.complete(lr_scale(0.1, resumed).code)
    assert "*=" not in code.split("#")[0]  # (set, not scaled: the same lrs however often it runs)
    scaled = _pasted(GROUPS, code, "BUILT")["optimizer"]
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx([0.005, 0.15])
    # two optimizers (a GAN's): the store keeps one's lrs, so each keeps its factor (D was set to G's lrs)
    two = dataclasses.replace(resumed, optimizers=(("optimizer", "model"), ("opt_d", "disc")))
    assert "for group in optimizer.param_groups: group['lr'] *= 0.1" in lr_scale(0.1, two).code


def test_a_model_change_says_to_come_after_the_weights_a_script_loads():
    from gradwatch.fix.candidates import norm, reinit
    from gradwatch.fix.names import read_names
    resumes = read_names("net = Net()\nopt = torch.optim.Adam(net.parameters())\nnet.load_state_dict(torch.load(p))\n",
                         _context([1e-3], optimizer="Adam"))
    assert "# apply after net is built and its weights loaded (load_state_dict)" in resumes.complete(reinit(resumes).code)
    assert "weights loaded" not in resumes.complete(lr_scale(0.1, resumes).code)
    assert "weights loaded" not in resumes.complete(norm("batch", resumes).code)  # before the optimizer: said there
    fresh = read_names("net = Net()\nopt = torch.optim.Adam(net.parameters())\n", _context([1e-3], optimizer="Adam"))
    assert "weights loaded" not in fresh.complete(reinit(fresh).code)


class SharedTanh(nn.Module):
    """One Tanh module, registered after the output layer, applied after the hidden layers only."""

    def __init__(self, output_sigmoid: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.out = nn.Linear(8, 1)
        self.act = nn.Sigmoid() if output_sigmoid else nn.Tanh()
        self.output_sigmoid = output_sigmoid

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return self.act(self.out(x)) if self.output_sigmoid else self.out(x)


def test_the_output_activation_is_what_the_forward_applies_last(tmp_path):
    """A shared Tanh registered after the last Linear was taken for the output's and kept, so the
    'Tanh -> LeakyReLU' trial swapped nothing (a re-init under a swap's name). A swap that really
    changes nothing (the shared module also gives the output) is not tried, and says why."""
    from gradwatch.fix.candidates import swap
    from gradwatch.fix.trial import run_trial_in_process
    from gradwatch.store import read_run

    model = SharedTanh()
    assert apply_to_model(model, {"swap": {"from": "Tanh", "to": "LeakyReLU"}}, torch.randn(4, 8)) == ""
    assert isinstance(model.act, nn.LeakyReLU)

    def train(output_sigmoid):
        model = SharedTanh(output_sigmoid)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            opt.step()

    swapped = run_trial_in_process(lambda: train(False), tmp_path / "t", swap("Tanh", "LeakyReLU", "auto"), 5)
    # the watch adopted the model as the remedy left it: the swap's look at the model was hidden from it
    assert [l.type for l in read_run(swapped.run_dir).layers if l.role == "activation"] == ["LeakyReLU"]
    kept = run_trial_in_process(lambda: train(True), tmp_path / "s", swap("Sigmoid", "LeakyReLU", "auto"), 5)
    assert kept.steps == 0 and "the output's (act), kept; nothing changed" in kept.not_applied


def test_a_swap_of_the_output_activation_alone_is_not_offered():
    from gradwatch.fix import hidden_activations
    from gradwatch.store.series import LayerInfo, RunSeries
    layers = [LayerInfo("0", "Linear", 0, "param"), LayerInfo("1", "ReLU", 1, "activation", activation="relu"),
              LayerInfo("2", "Linear", 2, "param"), LayerInfo("3", "Sigmoid", 3, "activation", activation="sigmoid")]
    run = RunSeries(layers, np.arange(1), np.ones(1), np.ones(1), {})
    assert hidden_activations(run) == {"relu"}
    # a head's sigmoid that a second head runs after: the watch saw the loss take it through no layer
    heads = layers + [LayerInfo("4", "Linear", 4, "param")]
    assert hidden_activations(RunSeries(heads, np.arange(1), np.ones(1), np.ones(1), {})) == {"relu", "sigmoid"}
    assert hidden_activations(RunSeries(heads, np.arange(1), np.ones(1), np.ones(1), {},
                                        meta={"output_layers": ["3"]})) == {"relu"}
    names = [c.name for c in from_findings([finding("vanishing_gradient")], hidden_activations(run))]
    assert "Sigmoid -> LeakyReLU + He init" not in names and "activations -> SELU + lecun init" in names
    assert "ReLU -> LeakyReLU + He init" not in [c.name for c in from_findings([finding("dead_units")], set())]


def test_reinitialising_sees_functional_and_shared_activations():
    """The trial re-initialises with the model's first batch, as gw.init_(model, example_input=batch)
    does: He for the layers that F.relu or a shared ReLU module follows (Xavier, 'followed by
    linear', before)."""
    import copy

    from gradwatch.remedies import init_

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
            self.act = nn.ReLU()
            self.out = nn.Linear(16, 1)

        def forward(self, x):
            h = nn.functional.relu(self.inp(x))
            for blk in self.blocks:
                h = self.act(blk(h))
            return torch.sigmoid(self.out(h))

    torch.manual_seed(0)
    model, x = Functional(), torch.randn(8, 4)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    report = init_(reference, example_input=x)
    assert [r.scheme for r in report] == ["he"] * 4 + ["xavier"]
    injector = Injector({"init": "auto"}, max_steps=None)
    try:
        torch.manual_seed(1)
        model(x)
    finally:
        injector.remove()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_the_adam_trial_follows_the_scripts_lr_schedule():
    """The script's scheduler acts on its own optimizer; the trial's Adam follows it, as the Adam
    the printed change builds in its place would (before, it ran at a constant 1e-3)."""
    def run(inject: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9) if inject
               else torch.optim.Adam(model.parameters(), lr=1e-2))
        _train_scheduled(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.3),
                         {"optimizer": "Adam", "lr": 1e-2} if inject else {})
        return model

    for a, b in zip(run(True).parameters(), run(False).parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_a_schedule_that_raised_the_lr_until_the_run_blew_up_gets_a_ceiling_at_its_best_loss():
    """A warm-up with no ceiling (lr x1.03 a step): the run trained best at step ~60 and blew up at
    130. The ceiling is the lr of the best running-median loss; a constant or falling lr gets none."""
    import numpy as np

    from gradwatch.store.series import RunSeries

    steps = np.arange(150)
    loss = np.where(steps < 60, 2.0 - steps / 40, 0.5 + (steps - 60) ** 2 / 500)
    ramp = 0.01 * 1.03 ** steps
    blow_up = Finding("exploding_gradient", "error", 130, ("fc0",), "m", {})
    run = RunSeries([], steps, loss, ramp, {})
    assert ramp[55] <= lr_ceiling(run, [blow_up]) <= ramp[65]  # not the 0.48 it had blown up at
    assert lr_ceiling(RunSeries([], steps, loss, np.full(150, 0.5), {}), [blow_up]) is None
    assert lr_ceiling(RunSeries([], steps, loss, 0.5 * 0.99 ** steps, {}), [blow_up]) is None
    assert lr_ceiling(run, [finding("vanishing_gradient")]) is None
    names = [c.name for c in from_findings([blow_up], set(), lr_ceiling=0.057)]
    assert names[0] == "learning rate at most 0.057"
    assert not any(c.name.startswith("learning rate at most") for c in from_findings([blow_up], set()))


def test_the_lr_ceiling_caps_each_step_and_the_schedule_goes_on_as_set():
    """Capped at 0.2, a schedule doubling 0.1 a step trains as one that stops at 0.2; the script's
    scheduler still sees the lr it set."""
    def run(cap: bool) -> tuple[nn.Module, list[float]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        factor = (lambda s: 2.0 ** s) if cap else (lambda s: min(2.0 ** s, 2.0))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        _train_scheduled(model, opt, sched, {"lr_cap": 0.2} if cap else {})
        return model, [g["lr"] for g in opt.param_groups]

    (capped, lrs), (reference, _) = run(True), run(False)
    for a, b in zip(capped.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    assert lrs == [pytest.approx(0.1 * 2 ** 5)]


def test_a_trial_that_removes_the_symptom_but_ends_no_lower_than_the_baseline_is_no_repair():
    """A GRU + lr x10 took a saturated RNN's vanishing away and ended at chance, above the baseline:
    printed as the repair, it gave a validation accuracy of 0.48."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=100, final_loss=0.6918, final_error=0.002,
                 findings=[finding("vanishing_gradient")])
    chance = Trial(Candidate("learning rate x10 + nn.RNN -> nn.GRU", {"lr_scale": 10.0, "recurrent": "gru"}), None, 0,
                   1.0, steps=100, final_loss=0.6962, final_error=0.002)
    result = FixResult(base, [chance])
    assert chance.works and result.winner is None and not result.repaired and result.above is chance
    assert result.within_noise is None
    console = Console(record=True, width=300)
    print_result(result, console)
    text = console.export_text()
    assert "No remedy beat the baseline" in text and "no lower than the baseline's 0.6918" in text
    learned = dataclasses.replace(chance, final_loss=0.31)
    assert FixResult(base, [learned]).winner is learned and FixResult(base, [learned]).above is None
    game = dataclasses.replace(base, own_loss=True)  # a GAN's mixed loss: its level is no measure
    assert FixResult(game, [chance]).winner is chance


def test_a_gan_trial_at_its_equilibrium_loss_still_works():
    """A tester's DCGAN with a vanishing generator: every trial took the vanishing away, and each was
    rejected as `loss_did_not_fall`: D + G's summed loss sits at its equilibrium (2.079) whether the
    generator learns or not. gw.init_(G), the trial's remedy, covered 8 of 8 modes pasted in."""
    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=100, final_loss=2.079, final_error=0.002,
                 findings=[finding("vanishing_gradient")], own_loss=True)
    reinit = Trial(Candidate("re-initialise per activation", {"init": "auto"}), None, 0, 1.0, steps=100,
                   final_loss=2.081, final_error=0.002, own_loss=True)
    reinit.first_loss = 2.079
    assert reinit.harmful == [] and reinit.works and FixResult(base, [reinit]).winner is reinit
    assert "loss_did_not_fall" in dataclasses.replace(reinit, own_loss=False).harmful


def test_a_best_trial_still_on_the_loss_scale_the_baseline_started_at_is_told_to_rescale():
    """A tester's multi-task model, its regression target ~313: every trial kept the raw targets, the
    best (Adam) ended at 3.9e4 and its change, pasted in, predicted worse than the mean."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result
    from gradwatch.diagnose.advice import LOSS_SCALE_CODE

    scaled = Finding("exploding_gradient", "error", 0, ("fc0",), "m", {},
                     ("loss scale: the loss is 4.85e+04 at the first step, before any update (cross-entropy ...)",))
    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=100, final_loss=float("inf"), final_error=0.0,
                 findings=[scaled])
    adam = Trial(Candidate("Adam (lr 1e-3)", {"optimizer": "adam"}), None, 0, 1.0, steps=100, final_loss=3.9e4,
                 final_error=10.0)
    console = Console(record=True, width=300)
    print_result(FixResult(base, [adam]), console)
    text = console.export_text()
    assert "The best trial still ends at 3.9e+04" in text and "(the loss is 4.85e+04 at the first step" in text
    assert LOSS_SCALE_CODE.splitlines()[1] in text
    console = Console(record=True, width=300)
    print_result(FixResult(base, [dataclasses.replace(adam, final_loss=0.8)]), console)  # brought to order 1
    assert "still ends at" not in console.export_text()


def test_the_full_trials_are_said_to_run_as_long_as_a_script_that_ends_before_the_budget():
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=90, final_loss=2.0, final_error=0.01)
    adam = Trial(Candidate("Adam (lr 1e-3)", {"optimizer": "adam"}), None, 0, 1.0, steps=90, final_loss=0.5,
                 final_error=0.01)
    console = Console(record=True, width=300)
    print_result(FixResult(base, [adam], budget_steps=100), console)
    assert "gradwatch fix: 1 full trial of 90 steps" in console.export_text()


def test_a_winner_whose_loss_barely_fell_is_not_said_to_repair_the_run():
    """A tester's RNN: orthogonal W_hh took the vanishing away and ended at 0.6887 from 0.6935,
    chance being 0.693 (61% accuracy), printed as "repairs the run"."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=100, final_loss=0.6916, final_error=0.0005,
                 first_loss=0.6936, findings=[finding("vanishing_gradient")])
    orth = Trial(Candidate("orthogonal W_hh", {"init": "orthogonal"}), None, 0, 1.0, steps=100, final_loss=0.6887,
                 final_error=0.0005, first_loss=0.6935)
    result = FixResult(base, [orth])
    assert result.winner is orth and result.repaired
    console = Console(record=True, width=300)
    print_result(result, console)
    text = console.export_text()
    assert "repairs the run" not in text and "is the best of the trials" in text
    assert "its loss fell only 0.7% (0.6935 -> 0.6887)" in text
    console = Console(record=True, width=300)
    print_result(FixResult(base, [dataclasses.replace(orth, final_loss=0.31)]), console)
    assert "repairs the run" in console.export_text()
    game = dataclasses.replace(orth, own_loss=True, final_loss=0.6985)  # a GAN's mixed loss: its level is no measure
    console = Console(record=True, width=300)
    print_result(FixResult(dataclasses.replace(base, own_loss=True), [game]), console)
    assert "repairs the run" in console.export_text()
    console = Console(record=True, width=300)
    print_result(FixResult(base, [dataclasses.replace(orth, first_loss=0.686)]), console)
    assert "its loss rose 0.4% (0.686 -> 0.6887)" in console.export_text()


def test_fewer_findings_at_the_baselines_loss_within_the_noise_is_no_repair():
    """A tester's post-LN transformer at lr 3e-2: lr x0.1 took the exploding gradient away and ended
    at 0.6031 against the baseline's 0.6033, said to repair the run; pasted in, the validation
    accuracy stayed at the majority class."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result

    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=168, final_loss=0.6033, final_error=0.004,
                 findings=[finding("exploding_gradient")])
    lower = Trial(Candidate("learning rate x0.1", {"lr_scale": 0.1}), None, 0, 1.0, steps=168, final_loss=0.6031,
                  final_error=0.004)
    result = FixResult(base, [lower])
    assert result.winner is None and result.above is lower and not result.repaired
    console = Console(record=True, width=300)
    print_result(result, console)
    assert "no lower than the baseline's 0.6033 beyond the noise of the two" in console.export_text()
    assert FixResult(base, [dataclasses.replace(lower, final_loss=0.45)]).winner is not None  # beyond it


def test_a_leader_that_only_took_the_symptom_away_does_not_hide_a_remedy_that_learnt():
    """A reviewer's: A removed both findings and ended at 0.99 (the baseline's 1.00, within the
    noise), B removed one and ended at 0.50: "No remedy beat the baseline" was said."""
    base = Trial(Candidate("baseline (no change)"), None, 0, 1.0, steps=100, final_loss=1.0, final_error=0.01,
                 findings=[finding("vanishing_gradient"), finding("dead_units")])
    a = Trial(Candidate("A", {"lr_scale": 10.0}), None, 0, 1.0, steps=100, final_loss=0.99, final_error=0.01)
    b = Trial(Candidate("B", {"lr_scale": 0.1}), None, 0, 1.0, steps=100, final_loss=0.50, final_error=0.01,
              findings=[finding("dead_units")])
    result = FixResult(base, [a, b])
    assert result.ranked[0] is a and result.winner is b and result.above is None
    assert FixResult(base, [a]).winner is None and FixResult(base, [a]).above is a


def test_a_trial_whose_scaler_skipped_its_last_iterations_ended_non_finite(tmp_path):
    """A reviewer's float16 overflow from iteration 30: each trial was stopped after 3 skipped
    iterations, its stored steps finite, and "ZClip + Adam repairs the run" was printed."""
    import torch as _torch

    from gradwatch.collect.watch import Watch
    from gradwatch.fix.trial import measure

    model = nn.Linear(2, 1)
    opt = _torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _torch.amp.GradScaler("cpu")
    with Watch(model, opt, out=tmp_path / "t", warn=False, status=False):
        for i in range(12):
            opt.zero_grad()
            loss = model(_torch.randn(4, 2)).pow(2).mean() * (float("inf") if i >= 9 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    trial = measure(Trial(Candidate("ZClip"), tmp_path / "t", 0, 1.0))
    assert trial.steps == 9 and trial.final_loss == float("inf") and not trial.works


def test_the_nan_note_asks_a_guard_only_of_an_operation_that_has_one(tmp_path):
    """An N(0, 1) ReLU MLP whose NaN came at step 1 from a Linear's aten.addmm was told to "guard that
    operation": a matmul has no guard; its overflow is values grown too large, the winner's repair."""
    from gradwatch.cli.fix_cmd import nan_note
    from gradwatch.fix.locate import Origin

    nan = Finding("non_finite", "error", 1, ("0",), "m", {"grad_growth_before": float("nan")})
    baseline = Trial(Candidate("b"), tmp_path, 0, 1.0, steps=2, final_loss=float("inf"), findings=[nan])
    winner = Trial(Candidate("lr"), tmp_path, 0, 1.0, steps=40, final_loss=0.03, first_loss=2.3, start_loss=2.3)
    for op, guarded in (("aten.addmm.default", False), ("aten.log.default", True)):
        origin = Origin(op, "train.py", 12, "out = net(x)", True, "Inf")
        note = nan_note(FixResult(baseline, [winner], budget_steps=40, origin=origin))
        assert note is not None and ("guard that operation" in note) == guarded, op
