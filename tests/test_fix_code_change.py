"""A finding whose remedy is a change to the code no trial can make (a zero_grad() missing from
weights updated by hand) gets no trial: fix says so, with the finding's own code, instead of "call
for no remedy". Where an optimizer steps, stale gradients get a trial: their gradients cleared after
each step."""

import pytest
import torch
from rich.console import Console
from torch import nn

from gradwatch.cli.fix_cmd import print_result
from gradwatch.diagnose.finding import Finding, Remedy
from gradwatch.fix import BASELINE, FixResult, Trial, fix
from gradwatch.fix.candidates import Candidate, from_findings, tried_for

STALE = Finding("stale_gradients", "error", 1, (), "The gradients are never cleared between weight updates (by hand).",
                {"optimizer": None}, (), (Remedy("Call model.zero_grad()", "model.zero_grad()  # after your update"),))


def _printed(result: FixResult) -> str:
    console = Console(record=True, width=400)
    print_result(result, console)
    return console.export_text()


def test_a_code_change_is_said_with_its_code_when_nothing_is_tried():
    """It said "Nothing to try: the baseline's findings call for no remedy (stale_gradients)", and
    not what to change."""
    assert not tried_for(STALE) and from_findings([STALE], {"relu"}, optimizer=None) == []
    base = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=0.6, first_loss=2.0, findings=[STALE])
    text = _printed(FixResult(base, [], budget_steps=40))
    assert "No remedy was tried: what the baseline shows is a change to the code" in text
    assert "stale_gradients (step 1) is a change to your code, which no trial can make" in text
    assert "    model.zero_grad()  # after your update" in text and "call for no remedy" not in text


def test_trials_beside_a_code_change_are_said_to_have_run_with_the_fault():
    blow = Finding("exploding_gradient", "error", 3, ("0",), "m", {})
    base = Trial(BASELINE, None, 0, 1.0, steps=40, final_loss=5.0, first_loss=2.0, findings=[STALE, blow])
    lower = Trial(Candidate("learning rate x0.1", {"lr_scale": 0.1}, "lr = 0.01"), None, 0, 1.0, steps=40,
                  final_loss=0.5, first_loss=2.0, findings=[STALE])
    text = _printed(FixResult(base, [lower], budget_steps=40))
    assert "learning rate x0.1" in text and "repairs the run" not in text  # the stale gradients are left
    assert "Every trial above ran with it too: make this change first" in text


def test_adam_in_place_of_an_optimizer_the_script_loads_a_state_into_says_the_old_state_will_not_load():
    """Pasted into a script that resumes (`opt.load_state_dict(ckpt["opt"])`), Adam fails to load the
    SGD checkpoint's state (KeyError: 'step'), which the code to paste did not say."""
    import torch
    from torch import nn

    from gradwatch.fix.candidates import adam
    from gradwatch.fix.names import Names

    model = nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 2)).sum().backward()
    sgd.step()
    swapped = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(KeyError):  # what the comment warns of: torch's behaviour, checked, not assumed
        swapped.load_state_dict(sgd.state_dict())
    names = Names(model="net", optimizer="opt", found=frozenset({"model", "optimizer"}))
    assert "load_state_dict" not in adam(names).code
    code = adam(Names(model="net", optimizer="opt", found=frozenset({"model", "optimizer"}), loaded=frozenset({"opt"}))).code
    assert code.startswith("opt = torch.optim.Adam(net.parameters(), lr=1e-3)")
    assert "does not load into Adam (a KeyError in opt.load_state_dict" in code


def test_stale_gradients_under_an_optimizer_get_a_trial_that_clears_them(tmp_path):
    """A forgotten optimizer.zero_grad(): before, every trial ran with the fault and lr x0.1 + ZClip
    ranked first. The trial that clears the gradients after each step removes the finding, and the
    loss it reaches is the one of the same script with the zero_grad() written in. The gradients
    are cleared before the next backward, not after the step: a script that reads them there found
    None and failed."""
    logged = []

    def script(clear: bool):
        def train():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.02)
            w = torch.randn(4, 1)
            for _ in range(60):
                x = torch.randn(32, 4)
                if clear:
                    opt.zero_grad()
                nn.functional.mse_loss(model(x), x @ w).backward()
                opt.step()
                logged.append(model[0].weight.grad.norm())  # read after the step: the trial must leave it
        return train

    result = fix(script(False), out=tmp_path / "stale", budget_steps=60)
    assert "stale_gradients" in result.baseline.harmful
    cleared = next(t for t in [*result.trials, *result.screened] if t.candidate.spec == {"zero_grad": True}
                   and t.steps == 60)
    assert "stale_gradients" not in cleared.harmful and cleared.works
    assert result.winner is not None and "zero_grad" in result.winner.candidate.spec
    assert "opt.zero_grad()" in result.change or "optimizer.zero_grad()" in result.change
    healthy = fix(script(True), out=tmp_path / "healthy", budget_steps=60)
    assert healthy.baseline.final_loss == pytest.approx(cleared.final_loss, rel=1e-6)


def _amp(fixed: bool):
    """A GradScaler whose first step overflows (a large initial scale, as fp16 runs often start)."""
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38)
    x = torch.randn(256, 10)
    for i in range(30):
        if fixed:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[i:i + 32]), 2 * x[i:i + 32, :1])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return model


def _lbfgs(fixed: bool):
    """L-BFGS calls the closure several times a step: each call must start cleared."""
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x = torch.randn(128, 5)

    def closure():
        if fixed:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), (x ** 2).sum(1, keepdim=True))
        loss.backward()
        return loss
    for _ in range(10):
        opt.step(closure)
    return model


def _gan(fixed: bool):
    """The discriminator's zero_grad() forgotten: the generator's backward writes into D's gradients."""
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    disc = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    opt_d, opt_g = torch.optim.SGD(disc.parameters(), lr=0.05), torch.optim.SGD(gen.parameters(), lr=0.05)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(20):
        real, z = torch.randn(32, 2) * 0.5 + 2, torch.randn(32, 4)
        if fixed:
            opt_d.zero_grad()
        (bce(disc(real), torch.ones(32, 1)) + bce(disc(gen(z).detach()), torch.zeros(32, 1))).backward()
        opt_d.step()
        opt_g.zero_grad()
        bce(disc(gen(z)), torch.ones(32, 1)).backward()
        opt_g.step()
    return disc


@pytest.mark.parametrize("script", [_amp, _lbfgs, _gan])
def test_the_zero_grad_trial_trains_as_the_change_written_in(tmp_path, script):
    """The trial must measure the change it prints. It did not: under a GradScaler whose step
    overflowed (no step, so nothing cleared the inf gradients: every later step skipped too);
    with L-BFGS (the closure's calls within a step still accumulated: loss 9.5e25 against 0.06);
    on a GAN (the generator's backward into D's gradients, which D's next step used)."""
    from gradwatch.fix.candidates import zero_grad
    from gradwatch.fix.trial import run_trial_in_process

    models = []
    run_trial_in_process(lambda: models.append(script(False)), tmp_path, zero_grad(), 1000)
    torch.manual_seed(0)  # as the trial seeds
    fixed = script(True)
    for a, b in zip(models[0].parameters(), fixed.parameters()):
        assert torch.equal(a, b)
