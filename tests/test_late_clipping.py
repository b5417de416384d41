"""Clipping called after optimizer.step() clips gradients no step uses: seen by the watch, said as a
finding with the script's line, and first among an exploding gradient's causes (a tester's
regressor clipped after the step and was told to clip)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_  # a script's own name, bound before any watch: rebound while one is attached

import gradwatch as gw
from gradwatch.diagnose import diagnose
from series_builder import build


def _train(where: str, limit: float = 1.0, steps: int = 6, watched: bool = True, lr: float = 0.1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    watch = gw.watch(model, opt, warn=False) if watched else None
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if where == "before":
            torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        opt.step()
        if where == "after":
            torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        if where == "value_after":
            nn.utils.clip_grad_value_(model.parameters(), clip_value=limit)
    run = watch.series() if watch else None
    if watch:
        watch.detach()
    return run, [p.detach().clone() for p in model.parameters()]


def test_a_clip_after_the_step_is_said_with_its_line():
    run, weights = _train("after")
    found = [f for f in diagnose(run) if f.kind == "late_clipping"]
    assert len(found) == 1 and found[0].first_step == 0 and found[0].severity == "warning"
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1)
                if text.strip() == 'if where == "after":') + 1
    assert found[0].evidence["where"] == f"test_late_clipping.py:{line}"
    assert "runs after optimizer.step()" in found[0].message
    assert "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1)\noptimizer.step()" in found[0].remedies[0].code
    _, unwatched = _train("after", watched=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, unwatched))  # the patch changes no number


def test_clip_by_value_after_the_step_is_said_too():
    run, _ = _train("value_after", limit=0.5)
    f = next(f for f in diagnose(run) if f.kind == "late_clipping")
    assert f.evidence["function"] == "clip_grad_value_" and "clip_value=0.5" in f.remedies[0].code


def test_a_clip_before_the_step_or_a_norm_measured_after_it_is_no_finding():
    for where, limit in (("before", 1.0), ("after", float("inf"))):  # inf: the norm logged, nothing clipped
        run, _ = _train(where, limit)
        assert not [f for f in diagnose(run) if f.kind == "late_clipping"], (where, limit)
        assert not run.meta.get("late_clip")


def test_the_patch_is_gone_with_the_watch():
    originals = [(m, n, getattr(m, n)) for m in (nn.utils, nn.utils.clip_grad) for n in ("clip_grad_norm_", "clip_grad_value_")]
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    with gw.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), warn=False):
        assert nn.utils.clip_grad_norm_ is not originals[0][2]  # patched while watched
    assert all(getattr(m, n) is f for m, n, f in originals)


def test_an_exploding_gradient_names_the_late_clip_first():
    run = build()
    run.meta["late_clip"] = [[3, {"function": "clip_grad_norm_", "where": "train.py:9", "limit": 1.0}]]
    run.metrics["grad_norm"][40:] *= 1e4  # a blow-up the clipping should have stopped
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.causes[0].startswith("clipping after the step: `clip_grad_norm_` at train.py:9")
    assert f.remedies[0].code.startswith("loss.backward()\ntorch.nn.utils.clip_grad_norm_")


def test_every_listener_of_the_patches_hears_a_clip():
    """fix's Injector listens too: without `clipped` every trial of a script that clips died in the
    patch (a tester's `fix` on a healthy script with clip_grad_norm_: "recorded no training step")."""
    from gradwatch.collect.patches import Listener
    from gradwatch.collect.watch import Watch
    from gradwatch.fix.inject import Injector
    heard = [n for n in vars(Listener) if not n.startswith("_")]
    assert "clipped" in heard
    for cls in (Watch, Injector):
        assert all(callable(getattr(cls, n, None)) for n in heard), cls


def _late(loop, steps: int = 4) -> list:
    """The late_clipping findings of `loop(model, opt, x, y)` run `steps` times under gw.watch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with gw.watch(model, opt, warn=False) as watch:
        for i in range(steps):
            loop(model, opt, x, y, i)
        run = watch.series()
    return [f for f in diagnose(run) if f.kind == "late_clipping"]


def test_a_late_clip_is_told_by_the_gradient_the_step_used_not_by_the_order_of_calls():
    """Reviewers' reproducers: the order of calls alone called a correct clip late and missed one."""
    def by_name(model, opt, x, y, i):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        clip_grad_norm_(model.parameters(), 1.0)

    def clipped_then_logged(model, opt, x, y, i):  # the step's gradients were clipped: the later call measures
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)

    critic = nn.Linear(1, 1)
    opt_c = torch.optim.SGD(critic.parameters(), lr=0.01)

    def actor_critic(model, opt, x, y, i):  # one backward, the actor steps, the critic is clipped before its step
        opt.zero_grad(), opt_c.zero_grad()
        (critic(model(x)) - y).pow(2).mean().backward()
        opt.step()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        opt_c.step()

    def by_hand(model, opt, x, y, i):  # gradients set by hand (PCGrad, MAML): no backward hook
        grads = torch.autograd.grad(((model(x) - y) ** 2).mean(), list(model.parameters()))
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    scaler = torch.amp.GradScaler("cpu")

    def scaled(model, opt, x, y, i):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    assert len(_late(by_name)) == 1 and torch.nn.utils.clip_grad.clip_grad_norm_ is clip_grad_norm_
    assert len(_late(scaled)) == 1
    for loop in (clipped_then_logged, actor_critic, by_hand):
        assert _late(loop) == [], loop.__name__


def test_the_remedy_for_clip_grads_with_norm_runs_when_pasted():
    """It takes a total norm computed before; printed with max_norm alone it raised a TypeError."""
    from gradwatch.diagnose.rules.late_clipping import remedy

    code = remedy({"function": "clip_grads_with_norm_", "limit": 1.0}).code
    model = nn.Linear(3, 1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exec(code, {"torch": torch, "model": model, "optimizer": optimizer, "loss": model(torch.randn(4, 3)).sum()})
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) <= 1.0 + 1e-5


def test_reviewed_again_a_clip_that_measures_or_precedes_is_no_late_one_and_a_late_one_after_it_is():
    """A third review: a clip in a closure or before zero-code mode's first step did not count as
    the step's own; an infinite-limit clip, or another model's, muted the watched step's late one."""
    other = nn.Linear(2, 2)

    def inf_then_late(model, opt, x, y, i):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the norm logged
        opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def others_then_late(model, opt, x, y, i):
        other(torch.randn(3, 2)).sum().backward()
        torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)  # another model's clip, before its own step
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def closure_then_logged(model, opt, x, y, i):
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            return loss
        opt.step(closure)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)

    assert len(_late(inf_then_late)) == 1 and len(_late(others_then_late)) == 1
    assert _late(closure_then_logged) == []


def test_zero_code_a_clip_before_the_first_step_then_a_logged_norm_is_no_late_clip(tmp_path):
    from gradwatch.collect.auto import AutoWatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for _ in range(4):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # the norm logged
    finally:
        watch.detach()
    assert not watch.stored_series().meta["late_clip"]


def test_a_clipping_function_the_script_put_in_torch_stays_its_own(tmp_path):
    """A script replaced torch.nn.utils.clip_grad_norm_ with its own per-tensor clip before the
    watch: the watch's wrapper of torch's function took its place, changed the training, and was
    never taken back."""
    def per_tensor(parameters, max_norm, *args, **kwargs):
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(min(1.0, max_norm / (float(p.grad.norm()) + 1e-6)))

    def train(watched: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        watch = gw.watch(model, opt, warn=False) if watched else None
        for _ in range(5):
            opt.zero_grad()
            (model(torch.randn(16, 4)) * 10).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        if watch:
            watch.detach()
        return [p.detach().clone() for p in model.parameters()]

    original = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = per_tensor
    try:
        assert all(torch.equal(a, b) for a, b in zip(train(True), train(False)))
        assert torch.nn.utils.clip_grad_norm_ is per_tensor
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def test_the_scripts_own_clipping_is_kept_as_the_runs_and_not_advised_again():
    """A tester's LSTM tagger clipped at 1 in its loop and blew up at SGD lr 20 (each step lr x 1,
    longer than the weights): it was told to clip the gradient norm at 1.0. The clipping before the
    step is kept in the run's meta as a trainer's is; a clip at or above it is not advised."""
    run, _ = _train("before", limit=1.0, steps=30, lr=50.0)
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1)
                if text.strip() == 'if where == "before":') + 1
    assert run.meta["grad_clip"] == f"the total norm to 1 (clip_grad_norm_ at test_late_clipping.py:{line})"
    found = {f.kind: f for f in diagnose(run)}
    assert "late_clipping" not in found
    for f in found.values():
        assert not any(r.code.startswith("torch.nn.utils.clip_grad_norm_") for r in f.remedies), f.kind
