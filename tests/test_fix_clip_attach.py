"""A clipping trial clips as the printed `gw.clip.attach(optimizer, clipper)` does: inside a
`step(closure)` on the gradients the closure computed, and unscaled under a GradScaler with a fused
optimizer (which unscales inside its own step). Its weights equal, bit for bit, those of the script
with the printed change pasted in."""

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.fix.candidates import clip_norm, clip_value
from gradwatch.fix.inject import Injector

SPECS = [clip_norm(0.01), clip_value(0.001)]  # (ZClip clips nothing in its warm-up)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _trained(train, spec: dict, pasted: str | None) -> torch.Tensor:
    """`train(model, opt_built)` run with the remedy injected (`spec`) or `pasted` (the printed
    code, with `optimizer` the script's) executed once the optimizer is built."""
    model = _model()

    def built(opt):
        if pasted:
            exec(pasted, {"gw": gw, "torch": torch, "optimizer": opt, "model": model, "batch": _batch(0)[0]})

    injector = Injector(spec, max_steps=None)
    injector.install_late()
    try:
        train(model, built)
    finally:
        injector.remove()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _closure_loop(model, built, optimizer=torch.optim.SGD, **kw) -> None:
    opt = optimizer(model.parameters(), **(kw or {"lr": 0.1}))
    built(opt)
    for i in range(4):
        x, y = _batch(i)

        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean().mul(100)
            loss.backward()
            return loss
        opt.step(closure)


def _fused_scaler_loop(model, built, optimizer) -> None:
    opt = optimizer(model.parameters(), lr=0.01, fused=True)
    built(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(4):
        x, y = _batch(i)
        opt.zero_grad()
        scaler.scale((model(x) - y).pow(2).mean().mul(100)).backward()
        scaler.step(opt)
        scaler.update()


def _check(train, cand) -> None:
    trial = _trained(train, cand.spec, None)
    pasted = _trained(train, {}, cand.code)
    unclipped = _trained(train, {}, None)
    assert torch.equal(trial, pasted)
    assert not torch.equal(trial, unclipped)  # the clipping did act


@pytest.mark.parametrize("cand", SPECS, ids=lambda c: c.name)
def test_a_closure_step_clips_the_closures_gradients(cand):
    _check(_closure_loop, cand)


def test_lbfgs_clips_every_closure_call():
    with pytest.warns(UserWarning, match="LBFGS"):  # the pasted attach warns the user, as it should
        _check(lambda m, b: _closure_loop(m, b, torch.optim.LBFGS, lr=0.5, max_iter=3), clip_norm(0.5))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_a_fused_optimizer_under_a_grad_scaler_is_clipped_unscaled(optimizer):
    try:
        optimizer([nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
    except (RuntimeError, ValueError) as exc:  # no fused kernel on this build's CPU
        pytest.skip(str(exc))
    _check(lambda m, b: _fused_scaler_loop(m, b, optimizer), clip_norm(0.01))


def test_an_adam_trial_clips_the_adam_that_steps():
    """Adam + clipping: the printed change builds Adam and attaches the clipper to it."""
    from gradwatch.fix.candidates import adam, combine
    cand = combine(adam(), clip_norm(0.01))
    trial = _trained(lambda m, b: _closure_free_loop(m, b), cand.spec, None)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gw.clip.attach(opt, gw.clip.ClipNorm(0.01))
    for i in range(4):
        x, y = _batch(i)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().mul(100).backward()
        opt.step()
    assert torch.equal(trial, torch.cat([p.detach().flatten() for p in model.parameters()]))


def _closure_free_loop(model, built) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    built(opt)
    for i in range(4):
        x, y = _batch(i)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().mul(100).backward()
        opt.step()


def _adam_closure(model, built) -> None:
    _closure_loop(model, built, torch.optim.SGD, lr=0.1)


def test_an_adam_trial_steps_on_the_closures_gradients():
    """The script steps SGD with a closure: the trial's Adam (and its clipper) use the gradients that
    closure computes, as the printed Adam's `step(closure)` does, not last step's."""
    from gradwatch.fix.candidates import adam, combine
    for cand in (adam(), combine(adam(), clip_norm(0.01))):
        trial = _trained(_adam_closure, cand.spec, None)
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if "clip" in cand.spec:
            gw.clip.attach(opt, gw.clip.ClipNorm(0.01))
        _closure_loop(model, lambda o: None, lambda params, **kw: opt)
        assert torch.equal(trial, torch.cat([p.detach().flatten() for p in model.parameters()]))


def test_an_adam_trial_of_a_closure_script_under_the_watch_trains_as_the_printed_adam(tmp_path):
    """Inside the script optimizer's step, Adam's step(closure) ran the watch's step pre-hook before
    the closure had made any gradient: every Adam trial of a closure script failed at step 0."""
    from gradwatch.fix.candidates import adam
    from gradwatch.fix.trial import run_trial_in_process
    from gradwatch.store import read_run

    def train(make=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), out=None):
        model = _model()
        optimizer = make(model)
        for i in range(6):
            x, y = _batch(i)

            def closure():
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            if out is not None:
                out.append(float(loss))

    for cand in (adam(), adam(unscheduled=True)):
        trial = run_trial_in_process(train, tmp_path / cand.name.replace(" ", "_"), cand, budget_steps=100)
        assert not trial.failed and trial.steps == 6, trial.output_tail(3)
        printed = []
        train(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), printed)
        assert read_run(trial.run_dir).loss.tolist() == printed


def test_clip_combined_with_adam_prints_the_adam_line_first():
    """Pasted in the printed order, a clipper attached on a line above `optimizer = Adam(...)` stays
    on the discarded optimizer: Adam ran unclipped where the trial clipped it."""
    from gradwatch.fix.candidates import adam, combine

    for a, b in ((clip_norm(0.05), adam()), (adam(), clip_norm(0.05)), (clip_value(1.0), adam(unscheduled=True))):
        code = combine(a, b).code
        assert code.index("torch.optim.Adam(") < code.index("gw.clip.attach("), code


def _scaler_overflow_loop(model, built, make=lambda ps: torch.optim.SGD(ps, lr=0.01, fused=True)) -> None:
    """An optimizer (`make`: a fused SGD) under a GradScaler, whose step 1 overflows (an inf in the
    batch): the scaler skips it."""
    opt = make(model.parameters())
    built(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for i in range(5):
        x, y = _batch(i)
        if i == 1:
            x[0, 0] = float("inf")
        opt.zero_grad()
        scaler.scale((model(x) - y).pow(2).mean().mul(100)).backward()
        scaler.step(opt)
        scaler.update()


def test_an_adam_trial_under_a_grad_scaler_trains_as_the_printed_adam_under_it():
    """The trial's Adam takes the fused optimizer's steps unscaled, and none on an overflow, as the
    printed (unfused) Adam does under the script's scaler."""
    from gradwatch.fix.candidates import adam, combine
    try:
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
    except (RuntimeError, ValueError) as exc:  # no fused kernel on this build's CPU
        pytest.skip(str(exc))
    for cand in (adam(), combine(adam(), clip_norm(0.01))):
        trial = _trained(_scaler_overflow_loop, cand.spec, None)
        model = _model()

        def clipped(opt):
            if "max_norm" in cand.spec:
                gw.clip.attach(opt, gw.clip.ClipNorm(0.01))
        _scaler_overflow_loop(model, clipped, lambda ps: torch.optim.Adam(ps, lr=1e-3))
        printed = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert torch.isfinite(trial).all() and torch.equal(trial, printed), cand.name


def test_a_norm_combined_with_clipping_pasted_after_the_optimizer_trains_as_the_trial():
    """One block after the optimizer is built: the norms' parameters join it (`optimizer=`), as the
    trial put them. Printed for before the optimizer, pasted here they were in none (weights 1)."""
    from gradwatch.fix.candidates import combine, norm

    cand = combine(norm("batch"), clip_norm(0.01))
    assert "optimizer=optimizer" in cand.code
    _check(_closure_free_loop, cand)
