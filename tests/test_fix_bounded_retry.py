"""A change to the model that blew up in screening where the baseline did not is screened once more
with its steps bounded (Adam, else on a normalisation that repaired the run): the change let the
gradient through, and the script's lr overshoots on it."""

import importlib
from pathlib import Path

from gradwatch.diagnose.finding import Finding
from gradwatch.fix import Trial, bounded_retry, fix
from gradwatch.fix.candidates import adam, combine, lr_scale, norm, swap
from test_fix_verdict import _train

fix_module = importlib.import_module("gradwatch.fix")

SELU, BN, ADAM, LEAKY = swap("*", "SELU", "lecun"), norm("batch"), adam(), swap("Sigmoid", "LeakyReLU", "auto")
NAN = Finding("non_finite", "error", 10, ("0",), "m", {})
VANISHING = Finding("vanishing_gradient", "error", 0, ("0",), "m", {})


def _trial(cand, loss: float, findings=(), steps: int = 50) -> Trial:
    return Trial(cand, Path("x"), 0, 0.1, steps=steps, final_loss=loss, first_loss=9.0, findings=list(findings))


def _fake(losses: dict[str, float]):
    """Screening and full trials of the candidates by name (SELU alone blows up), the baseline real."""
    real = fix_module.run_trial_in_process

    def trial(command, run_dir, cand, steps, trained=None, locate_at=None):
        if cand is fix_module.BASELINE:
            return real(command, run_dir, cand, steps, trained=trained)
        if cand.name == SELU.name:
            return _trial(cand, float("inf"), [NAN], steps=14)
        return _trial(cand, losses.get(cand.name, 3.0), steps=steps)
    return trial


def test_a_swap_that_blew_up_is_screened_again_with_adam_and_wins(tmp_path, monkeypatch):
    """A 10-layer sigmoid MLP under SGD at lr 0.1: SELU + LeCun blew up in 14 steps, BatchNorm led
    (1.26), and Adam screened on it only (1.45); SELU + Adam reached 0.024 in full (healthy 0.032)."""
    selu_adam = combine(SELU, ADAM).name
    screened = {BN.name: 1.26, selu_adam: 0.19, combine(BN, ADAM).name: 1.45}
    monkeypatch.setattr(fix_module, "run_trial_in_process", _fake(screened))
    result = fix(_train, out=tmp_path / "fix", budget_steps=40, candidates=[SELU, BN, ADAM], progress=[].append)
    assert [t.candidate.name for t in result.screened] == [SELU.name, BN.name, selu_adam, combine(BN, ADAM).name]
    assert result.winner.candidate.name == selu_adam


def test_without_an_optimizer_swap_it_goes_on_the_norm_that_repaired_the_run():
    """Weights updated by hand (no Adam offered): SELU on BatchNorm, 0.032 against BatchNorm +
    LeakyReLU's 0.075 for a small-init ReLU MLP."""
    done = [_trial(SELU, float("inf"), [NAN], steps=23), _trial(BN, 0.9), _trial(LEAKY, 1.5)]
    retry = bounded_retry(_trial(None, 2.3, [VANISHING]), done, [SELU, BN, LEAKY])
    assert retry is not None and retry.spec == {**SELU.spec, **BN.spec}


def test_no_retry_when_the_baseline_blew_up_or_nothing_bounds_the_change():
    done = [_trial(SELU, float("inf"), [NAN], steps=23), _trial(BN, 0.9)]
    blown = _trial(None, float("inf"), [NAN])
    assert bounded_retry(blown, done, [SELU, BN, ADAM]) is None  # the change missed the baseline's fault
    healthy = _trial(None, 2.3, [VANISHING])
    assert bounded_retry(healthy, [_trial(SELU, 0.5), _trial(BN, 0.9)], [SELU, BN, ADAM]) is None  # nothing blew up
    assert bounded_retry(healthy, [done[0], _trial(BN, 0.9, [NAN])], [SELU, BN]) is None  # no bound repaired it
    blown_lr = combine(BN, lr_scale(10.0))  # on the leader: the lr's own blow-up, not the change's
    assert bounded_retry(healthy, [_trial(BN, 0.9), _trial(blown_lr, float("inf"), [NAN])], [BN, ADAM]) is None


def test_the_retry_is_not_screened_twice():
    done = [_trial(SELU, float("inf"), [NAN]), _trial(combine(SELU, ADAM), 0.2)]
    assert bounded_retry(_trial(None, 2.3, [VANISHING]), done, [SELU, ADAM]) is None


def test_a_trial_that_failed_did_not_blow_up_and_one_whose_loss_climbed_did():
    """BatchNorm on one sample a step raises: the change broke the script, and bounded it fails alike.
    A loss that went 2.97 -> 15.8 in 15 steps left no finding, and blew up all the same."""
    from gradwatch.fix import blew_up

    crashed = Trial(BN, Path("x"), 1, 0.1, steps=0)
    assert not blew_up(crashed)
    assert blew_up(Trial(SELU, Path("x"), 0, 0.1, steps=15, final_loss=15.8, first_loss=2.97))
    assert not blew_up(Trial(SELU, Path("x"), 0, 0.1, steps=15, final_loss=2.5, first_loss=2.97))
    assert blew_up(_trial(SELU, float("inf"), [NAN], steps=14))


def test_a_change_that_adds_parameters_is_printed_before_the_optimizer_that_must_train_them():
    """Pasted as printed, the Adam built before insert_norm never trained the norms (the trial did)."""
    import torch
    from torch import nn

    import gradwatch as gw
    from gradwatch.fix.candidates import clip_norm

    for a, b in ((ADAM, BN), (BN, ADAM)):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        scope = {"gw": gw, "torch": torch, "nn": nn, "model": model, "batch": torch.zeros(2, 4),
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
        exec(combine(a, b).code, scope)
        held = {id(p) for g in scope["optimizer"].param_groups for p in g["params"]}
        assert isinstance(scope["optimizer"], torch.optim.Adam)
        assert {id(p) for p in scope["model"].parameters()} <= held  # the norms' too
    lines = combine(clip_norm(1.0), ADAM).code.splitlines()
    assert lines[0] == ADAM.code.splitlines()[0]  # the clipper on the Adam, not the discarded optimizer
