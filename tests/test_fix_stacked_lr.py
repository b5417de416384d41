"""An lr scale is screened on top of a leader that repaired the run, as the optimizer swap is; an
Adam tried against a schedule the baseline blames runs at a constant lr, not along that schedule."""

import importlib

import torch
from torch import nn

from gradwatch.diagnose.finding import Finding
from gradwatch.fix import Trial, fix
from gradwatch.fix.candidates import adam, from_findings, lr_scale, swap
from gradwatch.fix.inject import Injector
from test_fix_verdict import _train

fix_module = importlib.import_module("gradwatch.fix")


def test_an_lr_scale_is_screened_on_the_leader_that_repaired_the_run(tmp_path, monkeypatch):
    """A 35-layer ReLU MLP under Adam (Glorot init, dying units): lr x0.1 alone left the units dead
    (2.30, as the baseline), so it was never paired; on the LeakyReLU + He leader (1.83 screened) it
    screened at 1.43 and reached 0.30 in full against the leader's 1.16."""
    leaky, lower = swap("ReLU", "LeakyReLU", "auto"), lr_scale(0.1)
    both = f"{leaky.name} + {lower.name}"
    loss = {leaky.name: 1.83, lower.name: 2.30, both: 1.43}
    dead = Finding("dead_units", "error", 0, ("0",), "m", {})

    def trial(command, run_dir, cand, steps, trained=None, locate_at=None):
        if cand is fix_module.BASELINE:
            return real(command, run_dir, cand, steps, trained=trained)
        return Trial(cand, run_dir, 0, 0.1, steps=steps, final_loss=loss.get(cand.name, 3.0), first_loss=9.0,
                     findings=[] if cand.name in (leaky.name, both) else [dead])

    real = fix_module.run_trial_in_process
    monkeypatch.setattr(fix_module, "run_trial_in_process", trial)
    result = fix(_train, out=tmp_path / "fix", budget_steps=40, candidates=[lower, leaky], progress=[].append)
    assert [t.candidate.name for t in result.screened] == [leaky.name, both]
    assert result.winner.candidate.name == both


def test_adam_against_a_blamed_schedule_is_unscheduled():
    blow_up = [Finding("exploding_gradient", "error", 50, ("0",), "m", {})]
    plain = next(c for c in from_findings(blow_up, set(), optimizer="SGD", lr=0.5) if "optimizer" in c.spec)
    capped = next(c for c in from_findings(blow_up, set(), optimizer="SGD", lr=0.5, lr_ceiling=0.01)
                  if "optimizer" in c.spec)
    assert "unscheduled" not in plain.spec and capped.spec["unscheduled"] is True
    assert "no lr scheduler" in capped.code and "param_groups" in capped.code  # a warm-up written by hand too


def _ramped(spec: dict, adam_pasted: bool) -> torch.Tensor:
    """An SGD whose ExponentialLR raises the lr 1.5x a step, with `spec` injected; or the printed
    unscheduled Adam pasted in its place (no scheduler)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    if adam_pasted:
        opt, sched = torch.optim.Adam(model.parameters(), lr=1e-3), None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.5)
    injector = Injector(spec, max_steps=None)
    injector.install_late()
    try:
        for i in range(6):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            if sched is not None:
                sched.step()
    finally:
        injector.remove()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_unscheduled_adam_trial_trains_as_the_printed_adam():
    cand = adam(unscheduled=True)
    trial, pasted = _ramped(cand.spec, False), _ramped({}, True)
    assert torch.equal(trial, pasted)
    assert not torch.equal(_ramped(adam().spec, False), pasted)  # the scheduled Adam follows the ramp
