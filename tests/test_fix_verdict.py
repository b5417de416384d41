"""gradwatch fix's verdict: what counts as a repair, and what runs when the finals do not hold."""

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.fix import Candidate, Trial, fix
from gradwatch.diagnose.finding import Finding
from gradwatch.fix.candidates import adam, from_findings, lr_scale, reinit
from gradwatch.fix.trial import NO_PROGRESS, final_error, first_loss

fix_module = importlib.import_module("gradwatch.fix")  # the package (gradwatch.fix is the function)


@pytest.fixture(autouse=True)
def _in_a_directory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_a_trial_whose_loss_ends_where_it_began_is_no_repair():
    """A 1D CNN at lr 2.0: lr x0.1 left no harmful finding and a finite loss, so it "repaired the
    run", at a loss of 1.249 after starting at 1.11 (chance for 3 classes is 1.0986): it had
    learned nothing, and the script's own validation loss after the printed change was 1.0990."""
    assert first_loss(np.array([np.nan, 1.1, 1.12, 0.9] + [0.5] * 36)) == pytest.approx(1.1)
    stuck = Trial(Candidate("lr"), None, 0, 1.0, steps=80, final_loss=1.249, first_loss=1.11)
    assert stuck.harmful == [NO_PROGRESS] and not stuck.works
    learned = Trial(Candidate("adam"), None, 0, 1.0, steps=80, final_loss=0.4, first_loss=1.11)
    assert learned.harmful == [] and learned.works
    assert learned.score < stuck.score


def test_a_trial_that_blew_up_in_its_first_tenth_and_ended_above_its_start_is_no_repair(tmp_path):
    """Adagrad at lr 3 with a ReLU swap: 2.47, then 65370, 160514 in a 35-step screening's first
    tenth, and 276 at its end (10-class cross-entropy; chance is 2.3). The first tenth's median,
    65370, made 276 a fall, and the trial a repair. Measured from a store, as fix does."""
    import gradwatch as gw
    from gradwatch.fix.trial import measure

    losses = [2.47, 65370.0, 160514.0] + [276.0 + i for i in range(32)]
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, out=str(tmp_path / "t"), warn=False) as watch:
        for value in losses:
            loss = model(torch.ones(1, 4)).sum() * 0 + value
            opt.zero_grad(); loss.backward(); opt.step()
    trial = measure(Trial(Candidate("swap"), tmp_path / "t", 0, 1.0))
    assert trial.start_loss == pytest.approx(2.47) and trial.first_loss > 276
    assert NO_PROGRESS in trial.harmful and not trial.works
    fell = Trial(Candidate("x"), None, 0, 1.0, steps=35, final_loss=2.0, first_loss=65370.0, start_loss=2.47)
    assert NO_PROGRESS not in fell.harmful  # below twice its start: it may have learnt


def test_a_finding_the_diagnosis_rates_info_is_no_harm_and_calls_for_no_remedy():
    """The diagnosis rates saturation "info" when the loss still fell after it (confident units), and
    vanishing through time when the task needed no long memory: a trial left with one has trained,
    and a baseline with only such findings has nothing to repair."""
    confident = Finding("saturation", "info", 40, ("1",), "m", {"at_init": False, "loss_since_onset": [1.0, 0.2]})
    trial = Trial(Candidate("x"), None, 0, 1.0, steps=80, final_loss=0.2, first_loss=2.3, findings=[confident])
    assert trial.harmful == [] and trial.works and trial.blocking == []
    blocking = Trial(Candidate("x"), None, 0, 1.0, steps=80, final_loss=0.2, first_loss=2.3,
                     findings=[Finding("saturation", "warning", 40, ("1",), "m", {"at_init": False})])
    assert blocking.harmful == ["saturation"] and not blocking.works
    assert from_findings(trial.blocking, {"tanh"}) == []


def test_units_the_updates_saturated_get_a_lower_lr_trial_whatever_the_optimizer():
    """A tanh MLP at SGD lr 3.0 (momentum 0.9): saturated from step 10, not at init, the loss rising
    from 2.3 to 671; the diagnosis said to lower the lr tenfold, but fix offered none under SGD (Adam
    won, 0.31 validation loss; lr 0.3 pasted in gave 0.65, accuracy 0.93 against 0.10)."""
    driven = Finding("saturation", "warning", 10, ("1", "3"), "m", {"at_init": False})
    assert "learning rate x0.1" in [c.name for c in from_findings([driven], {"tanh"}, optimizer="SGD", lr=3.0)]
    at_init = Finding("saturation", "warning", 0, ("1",), "m", {"at_init": True})  # the init's scale: no lr trial
    assert "learning rate x0.1" not in [c.name for c in from_findings([at_init], {"tanh"}, optimizer="SGD", lr=0.1)]


def test_a_lower_loss_within_the_noise_is_no_winner(tmp_path):
    """An LSTM that must remember its first token over 80 steps, at chance (0.6943, ln 2 = 0.693):
    "Adam + forget-gate bias 1" ended at 0.6927 with the same vanishing gradient left, and fix printed
    it as the change to make; pasted in, the validation accuracy was 0.48 against the baseline's 0.50.
    A standard error of 0.0046 on the baseline's final loss puts 0.0016 lower well within the noise."""
    from rich.console import Console

    from gradwatch.cli.fix_cmd import print_result
    from gradwatch.fix import FixResult

    rng = np.random.default_rng(0)
    noisy = 0.694 + 0.02 * rng.standard_normal(200)
    se = final_error(noisy)  # the median's standard error over the last tenth: 1.2533 s / sqrt(n), s robust (MAD)
    last = noisy[-20:]
    assert se == pytest.approx(1.2533 * 1.4826 * np.median(np.abs(last - np.median(last))) / np.sqrt(20))
    assert se == pytest.approx(1.2533 * 0.02 / np.sqrt(20), rel=0.5)  # (the noise's own scale, 0.02)
    bursts = last.copy()
    bursts[[3, 11]] = [1.06e6, 7.3e4]  # a blow-up's bursts in the window: the median's error barely moves
    assert final_error(np.concatenate([noisy[:-20], bursts])) < 2 * se
    assert np.isnan(final_error(np.array([1.0, np.inf]))) and np.isnan(final_error(np.array([1.0])))
    vanishing = [Finding("vanishing_gradient", "warning", 0, ("lstm",), "m", {})]
    base = Trial(Candidate("baseline (no change)"), tmp_path, 0, 1.0, steps=200, final_loss=0.6943,
                 first_loss=0.70, findings=vanishing, final_error=0.0046)
    close = Trial(Candidate("Adam + forget"), tmp_path, 0, 1.0, steps=200, final_loss=0.6927,
                  first_loss=0.70, findings=vanishing, final_error=0.0022)
    result = FixResult(base, [close], budget_steps=200)
    assert result.winner is None and result.within_noise is close
    console = Console(record=True, width=200)
    print_result(result, console)
    assert "No remedy beat the baseline. The best, Adam + forget, ended at 0.6927 against 0.6943: within the noise" \
        in console.export_text()
    clear = Trial(Candidate("Adam + forget"), tmp_path, 0, 1.0, steps=200, final_loss=0.60,
                  first_loss=0.70, findings=vanishing, final_error=0.0022)
    assert FixResult(base, [clear], budget_steps=200).winner is clear  # 0.094 lower: 19 standard errors
    # fewer harmful findings at chance, within the noise of the baseline's loss: the symptom gone,
    # nothing learnt (no repair since a tester's post-LN transformer, 0.6031 against 0.6033)
    gone = Trial(Candidate("lr"), tmp_path, 0, 1.0, steps=200, final_loss=0.6930, first_loss=0.70, final_error=0.002)
    assert FixResult(base, [gone], budget_steps=200).winner is None
    learnt = dataclasses.replace(gone, final_loss=0.66)
    assert FixResult(base, [learnt], budget_steps=200).winner is learnt  # fewer findings, beyond the noise: a repair


def _train():
    """SGD steps of a linear regression, past a budget of 40: a baseline that runs (the remedies'
    trials are faked), whose screening is a quarter of it (a script that ended first would be
    screened in full)."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        (model(torch.randn(8, 4)) - 10).pow(2).mean().backward()
        opt.step()


def test_when_the_finals_do_not_hold_the_next_screening_repair_gets_its_full_trial(tmp_path, monkeypatch):
    """The CNN again: lr x0.1 led the screening (0.197), the only final, then climbed back to 1.249
    at full length, and fix ended with it while Adam, which had also repaired the run in screening
    (1.011), never had a full trial."""
    lower, adamw = lr_scale(0.1), adam()
    screen = {lower.name: 0.197, adamw.name: 1.011}
    full = {lower.name: 1.249, adamw.name: 0.45}

    real = fix_module.run_trial_in_process

    def trial(command, run_dir, cand, steps, trained=None, locate_at=None):
        if cand is fix_module.BASELINE:
            return real(command, run_dir, cand, steps, trained=trained)
        loss = full[cand.name] if steps == 40 else screen[cand.name]
        return Trial(cand, run_dir, 0, 0.1, steps=steps, final_loss=loss, first_loss=1.11, cut=True)  # budget-ended

    monkeypatch.setattr(fix_module, "run_trial_in_process", trial)
    said = []
    result = fix(_train, out=tmp_path / "fix", budget_steps=40, candidates=[lower, adamw], progress=said.append)
    assert [t.candidate.name for t in result.trials] == [lower.name, adamw.name]
    assert result.winner.candidate.name == adamw.name and result.repaired
    assert "did not hold" in said[-1]


def test_an_optimizer_swap_is_screened_on_top_of_a_leader_that_repaired_the_run(tmp_path, monkeypatch):
    """An 8-layer ReLU MLP initialised 2.8x He under SGD: Adam alone screened at 448 (the init still
    blew it up), re-initialising alone at 2.14 and ran alone, ending at 0.99 where the same net with He
    init and Adam reaches 0.06. Adam is now screened last, on the re-initialised net, and runs in the
    finals; where the leader did not repair the run (the optimizer may be the fault) Adam runs alone."""
    re_init, lower, swap_opt = reinit(), lr_scale(0.1), adam()
    loss = {re_init.name: 2.14, lower.name: 5.0, swap_opt.name: 448.0, f"{re_init.name} + {swap_opt.name}": 0.5}
    exploding = Finding("exploding_gradient", "error", 0, ("0",), "m", {})
    repairs = {re_init.name, f"{re_init.name} + {swap_opt.name}"}

    real = fix_module.run_trial_in_process
    seen = []

    def trial(command, run_dir, cand, steps, trained=None, locate_at=None):
        if cand is fix_module.BASELINE:
            return real(command, run_dir, cand, steps, trained=trained)
        seen.append(cand.name)
        return Trial(cand, run_dir, 0, 0.1, steps=steps, final_loss=loss.get(cand.name, 3.0), first_loss=9.0,
                     findings=[] if cand.name in repairs else [exploding])

    monkeypatch.setattr(fix_module, "run_trial_in_process", trial)
    result = fix(_train, out=tmp_path / "fix", budget_steps=40, candidates=[swap_opt, lower, re_init], progress=[].append)
    stacked = f"{re_init.name} + {swap_opt.name}"
    # the lr scale is stacked too (its own test: tests/test_fix_stacked_lr.py)
    assert [t.candidate.name for t in result.screened] == [re_init.name, stacked, f"{re_init.name} + {lower.name}"]
    assert [t.candidate.name for t in result.trials] == [stacked]  # re-initialising alone: not within 2x
    assert result.winner.candidate.name == stacked
    repairs.clear()  # no screen repairs the run: Adam is screened alone
    seen.clear()
    fix(_train, out=tmp_path / "fix2", budget_steps=40, candidates=[swap_opt, lower, re_init], progress=[].append)
    # re-initialising blew up where this baseline did not: once more with Adam (tests/test_fix_bounded_retry.py);
    # then Adam and the lr scale alone
    assert seen[:4] == [re_init.name, stacked, swap_opt.name, lower.name]


def test_the_spare_final_is_the_next_screened_remedy_even_one_that_left_a_finding():
    """A deep tanh Trainer: Tanh -> LeakyReLU + He screened as the only repair (2.394) and diverged
    at full length; BatchNorm, which had brought the loss from 2.31 to 1.25 but left an
    exploding-gradient finding, was never run in full, and fix said no remedy beat the baseline."""
    from gradwatch.diagnose.finding import Finding
    from gradwatch.fix import FixResult, spare_final
    from gradwatch.fix.candidates import norm, swap

    def t(cand, loss, *kinds):
        return Trial(cand, None, 0, 0.1, steps=20, final_loss=loss, first_loss=2.41,
                     findings=[Finding(k, "error", 0, (), "m", {}) for k in kinds])

    leaky, batch = swap("Tanh", "LeakyReLU", "auto"), norm("batch")
    base = t(Candidate("baseline"), 2.33, "vanishing_gradient")
    screened = [t(leaky, 2.394), t(batch, 1.249, "exploding_gradient"), t(adam(), 2.309, "vanishing_gradient")]
    diverged = t(leaky, float("inf"), "non_finite")
    assert spare_final(FixResult(base, [diverged], screened=screened)) == batch
    assert spare_final(FixResult(base, [t(leaky, 0.5)], screened=screened)) is None  # the leader held
    # a leader that did not repair the run in screening had its finals picked for that: no spare
    assert spare_final(FixResult(base, [diverged], screened=screened[1:])) is None


ONE_CYCLE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
# BUILT
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=8.0, total_steps=400)
lrs = []
for _ in range(400):
    opt.step()
    lrs.append(opt.param_groups[0]["lr"])
    sched.step()
"""


def _scheduled_lrs(source: str) -> list[float]:
    ns: dict = {}
    exec(source, ns)
    return ns["lrs"]


def test_the_lr_change_under_a_schedule_names_the_factor_not_a_peak_the_budget_saw():
    """OneCycleLR(max_lr=8.0) over 400 steps, a budget of 80: the trial scaled every lr by 0.1 (a
    peak of 0.8), but the code said `group['lr'] = 0.605` (the warm-up's lr at step 80, x0.1),
    which, pasted before the scheduler, changed nothing (the script's validation loss stayed 2.308),
    and as max_lr=0.605 was another run than the one measured. The script's own OneCycleLR line
    comes back with its max_lr scaled (a tester's backbone and head at max_lr=[2.0, 8.0]: the code
    was `group['lr'] *= 0.1`, which OneCycleLR overrides, the right value only in a comment)."""
    from gradwatch.diagnose.advice import Context
    from gradwatch.fix.names import read_names
    from gradwatch.store.series import RunSeries

    warm_up = np.linspace(0.32, 6.05, 80)
    run = Context(RunSeries([], np.arange(80), np.ones(80), warm_up, {}, meta={"optimizer": "SGD"}))
    sched_line = "sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=8.0, total_steps=400)"
    code = lr_scale(0.1, read_names(ONE_CYCLE, run)).code
    assert "0.605" not in code and code.startswith("sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.8,")
    assert max(_scheduled_lrs(ONE_CYCLE.replace(sched_line, code))) == pytest.approx(0.8)  # what the trial ran
    # per-group max_lr, and CyclicLR (base_lr too), by position or keyword: each scaled
    groups = ONE_CYCLE.replace("max_lr=8.0", "[8.0, 8.0]")
    assert "OneCycleLR(opt, [0.8, 0.8], total_steps=400)" in lr_scale(0.1, read_names(groups, run)).code
    cyclic = ONE_CYCLE.replace(sched_line, "sched = torch.optim.lr_scheduler.CyclicLR(opt, 0.5, max_lr=8.0)")
    assert "CyclicLR(opt, 0.05, max_lr=0.8)" in lr_scale(0.1, read_names(cyclic, run)).code
    # a max_lr the source does not give as a number: no line to rebuild, and the comment says what to do
    variable = ONE_CYCLE.replace("max_lr=8.0", "max_lr=peak").replace("# BUILT", "peak = 8.0")
    code = lr_scale(0.1, read_names(variable, run)).code
    assert "group['lr'] *= 0.1" in code and "multiply that by 0.1" in code
    assert max(_scheduled_lrs(variable.replace("# BUILT", code.split("#")[0]))) == pytest.approx(8.0)  # no pretence
    # a scheduler that scales from the lr it finds (StepLR): before it, and no word of OneCycleLR
    step = ONE_CYCLE.replace(sched_line, "sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)")
    code = lr_scale(0.1, read_names(step, run)).code
    assert "OneCycleLR" not in code and "before a scheduler is built" in code
    assert max(_scheduled_lrs(step.replace("# BUILT", code.split("#")[0]))) == pytest.approx(0.001)
    # without a schedule: the value, and no word of a scheduler
    flat = read_names(ONE_CYCLE, Context(RunSeries([], np.arange(3), np.ones(3), np.full(3, 2.0), {},
                                                   meta={"optimizer": "SGD"})))
    assert "group['lr'] = 0.2" in lr_scale(0.1, flat).code and "OneCycleLR" not in adam(flat).code


PARTS = """
import torch
from torch import nn
net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))
optim = torch.optim.SGD([{"params": net[:-1].parameters(), "lr": 0.5}, {"params": net[-1].parameters(), "lr": 0.1}])
x = torch.randn(16, 4)
for _ in range(3):
    optim.zero_grad()
    net(x).pow(2).mean().backward()
    optim.step()
"""


def test_the_model_is_named_when_the_optimizer_takes_it_in_parts():
    """A backbone and a head at their own lrs (`net[:-1]`, `net[-1]`): the printed change said
    `model` ("not found in your script") although the loop trains `net`."""
    from gradwatch.fix.candidates import norm
    from gradwatch.fix.names import read_names

    names = read_names(PARTS)
    assert (names.model, names.optimizer, names.batch) == ("net", "optim", "x")
    code = names.complete(norm("batch", names).code)
    assert "not found" not in code
    ns: dict = {}
    exec(PARTS.replace("optim = ", "batch = torch.zeros(2, 4)\n" + code + "\noptim = "), ns)
    assert any(isinstance(m, nn.BatchNorm1d) for m in ns["net"].modules())
    # parts of a module the loop never calls (two models' parts, a wrapper): which one trains is unclear
    assert read_names(PARTS.replace("net(x)", "other(x)")).model == "model"
