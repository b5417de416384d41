"""gw.guard: non-finite steps change nothing, are counted, trigger restore + lower lr, and
GradScaler's own overflow steps are not counted twice."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.errors import ConfigError
from gradwatch.remedies.guard import Guard, guard


def setup(seed: int = 0, lr: float = 0.01):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return model, opt


def backward(model: nn.Module, step: int, poison: bool = False) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if poison:
        model[2].weight.grad[0, 1] = float("nan") if step % 2 else float("inf")


def state_copy(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        for name in state_a[k]:
            assert torch.equal(state_a[k][name], state_b[k][name]), (k, name)


def test_non_finite_step_changes_nothing_and_training_continues_identically():
    model, opt = setup()
    twin, twin_opt = setup()
    g = guard(opt)
    for step in range(3):
        backward(model, step), opt.step()
        backward(twin, step), twin_opt.step()
    before = state_copy(model, opt)
    backward(model, 3, poison=True)
    with pytest.warns(UserWarning, match=r"skipped optimizer step 3 \(the 4th step\)"):
        assert opt.step() is None
    assert_same(state_copy(model, opt), before)  # weights, Adam moments and step count untouched
    assert g.skipped == 1 and g.steps == 3
    for step in range(4, 7):  # afterwards, exactly the run that never saw the bad batch
        backward(model, step), opt.step()
        backward(twin, step), twin_opt.step()
    assert_same(state_copy(model, opt), state_copy(twin, twin_opt))
    assert "1 of 7 steps skipped" in g.report()


def test_counted_and_warned_once():
    model, opt = setup()
    g = guard(opt, patience=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            backward(model, step, poison=step in (2, 5))
            opt.step()
    assert g.skipped == 2 and g.steps == 6 and g.consecutive == 0 and g.restores == 0
    assert sum("skipped optimizer step" in str(w.message) for w in caught) == 1


def test_patience_bad_steps_restore_the_snapshot_and_lower_lr():
    model, opt = setup(lr=0.1)
    g = guard(opt, patience=3, lr_factor=0.5, snapshot_every=2)
    saved = None
    for step in range(5):  # snapshots before good steps 0, 2, 4
        if step == 4:
            saved = state_copy(model, opt)
        backward(model, step)
        opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5, 8):
            backward(model, step, poison=True)
            opt.step()
    assert g.restores == 1 and g.consecutive == 0 and g.skipped == 3
    assert_same(state_copy(model, opt), saved)
    assert opt.state_dict()["state"][0]["step"] == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert any("restored to good step 4" in str(w.message) and "lr multiplied by 0.5" in str(w.message)
               for w in caught)
    # the snapshot survives the steps after a restore: a second restore goes back to it again
    backward(model, 9), opt.step()
    with pytest.warns(UserWarning, match="restored to good step 4"):
        for step in range(10, 13):
            backward(model, step, poison=True), opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_gradscaler_overflow_is_not_counted_by_the_guard():
    model, _ = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = guard(opt)
    for step in range(4):
        x = torch.randn(5, 6)
        loss = model(x).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("inf")  # an overflow, as fp16 would make
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert unchanged == (step == 1)  # the scaler skipped it itself
    assert scaler.get_scale() < 1024.0
    assert g.skipped == 0 and g.steps == 3


def test_scaler_managed_optimizer_is_passed_through():
    model, _ = setup()
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = guard(opt)
    scaler.scale(model(torch.randn(5, 6)).square().mean()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert g.skipped == 0 and g.passed_through == 1
    # before, the report read "0 of 0 steps skipped" as if the guard had checked everything
    assert g.report().endswith("1 passed through unchecked (a non-torch optimizer's closure, or "
                               "GradScaler with an optimizer that skips overflow steps itself)")


def test_remove_and_context_manager_restore_step():
    model, opt = setup()
    original = opt.step
    with guard(opt) as g:
        assert opt.step is not original and "step" in vars(opt)
    assert "step" not in vars(opt) and opt.step == original
    g.remove()  # twice is harmless
    backward(model, 0, poison=True)
    opt.step()  # unguarded now: the NaN reaches the weights
    assert torch.isnan(model[2].weight).any()


def test_scheduler_built_after_the_guard():
    """torch's schedulers re-bind optimizer.step's __func__ to the optimizer: the guard must still
    skip bad steps inside, the schedule must match an unguarded twin, and remove() must leave a
    step that passes through."""
    model, opt = setup()
    twin, twin_opt = setup()
    g = guard(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=2, gamma=0.5)
    for step in range(5):
        backward(model, step), opt.step(), sched.step()
        backward(twin, step), twin_opt.step(), twin_sched.step()
    backward(model, 5, poison=True)
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert g.skipped == 1 and g.steps == 5
    assert_same(state_copy(model, opt), state_copy(twin, twin_opt))
    assert opt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"] == 0.01 * 0.5 ** 2
    g.remove()
    backward(model, 6, poison=True)
    opt.step()  # removed: the scheduler's wrapper stays, the guard inside passes the NaN through
    assert torch.isnan(model[2].weight).any() and g.skipped == 1


def test_closure_steps_of_an_optimizer_from_elsewhere_pass_through():
    class SAMLike(torch.optim.SGD):  # not torch's: it may call the closure between two updates
        pass

    model = nn.Linear(3, 1)
    opt = SAMLike(model.parameters(), lr=0.1)
    g = Guard(opt)
    x, y = torch.randn(4, 3), torch.randn(4, 1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert g.passed_through == 1 and g.skipped == 0


def lbfgs_run(guarded: bool, bad_step: int | None, bad_call: int) -> tuple[list[torch.Tensor], dict, list]:
    """5 LBFGS steps of a small tanh MLP; at `bad_step` the closure's `bad_call`-th call (0: the first,
    before any update; 2: after the weights moved) leaves an Inf gradient. Unguarded, the bad step is
    not taken at all (the reference the guarded run must equal)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    g = Guard(opt) if guarded else None
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    losses = []
    for step in range(5):
        calls = []

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == bad_step and len(calls) == bad_call:
                model[2].weight.grad[0, 0] = float("inf")
            calls.append(1)
            return loss

        if guarded or step != bad_step:
            losses.append(float(opt.step(closure)))
    if g is not None:
        assert (g.skipped, g.steps, g.passed_through) == (1, 4, 0)
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()["state"], losses


def same_state(a, b) -> bool:
    """LBFGS's state: tensors, numbers and lists of tensors, compared exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("bad_call", [0, 2], ids=["first call", "after the weights moved"])
def test_lbfgs_step_with_a_non_finite_closure_call_is_undone(bad_call):
    # Passed through unchecked, one Inf gradient made every LBFGS weight NaN for good. Each closure
    # call is checked now; the step stops at the bad one and its weights and state are put back, so
    # the run equals one that never took that step, bit for bit, and goes on training.
    with pytest.warns(UserWarning, match="skipped optimizer step 2"):
        weights, state, losses = lbfgs_run(True, bad_step=2, bad_call=bad_call)
    ref_weights, ref_state, ref_losses = lbfgs_run(False, bad_step=2, bad_call=bad_call)
    assert all(torch.equal(w, r) for w, r in zip(weights, ref_weights))
    assert same_state(state, ref_state)
    assert losses[:2] + losses[3:] == ref_losses and all(np.isfinite(ref_losses))


@pytest.mark.parametrize("kwargs, named", [({"patience": 0}, "patience=0"), ({"lr_factor": 0.0}, "lr_factor=0.0"),
                                           ({"lr_factor": 1.5}, "lr_factor=1.5"),
                                           ({"snapshot_every": -1}, "snapshot_every=-1"),
                                           ({"patience": 2.0}, "patience=2.0"), ({"patience": True}, "patience=True"),
                                           ({"scheduler": "sched"}, "scheduler='sched'")])
def test_bad_input(kwargs, named):
    _, opt = setup()
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        guard(opt, **kwargs)
    assert "step" not in vars(opt)


def test_optimizer_without_params():
    _, opt = setup()
    for group in opt.param_groups:
        group["params"] = []
    with pytest.raises(ConfigError, match="no parameters"):
        guard(opt)
    with pytest.raises(ConfigError, match="optimizer='opt' is not a torch.optim.Optimizer"):
        guard("opt")


def test_huge_but_finite_gradient_is_not_skipped():
    model, opt = setup()
    g = guard(opt)
    backward(model, 0)
    model[0].weight.grad[0, 0] = 1e25  # its square overflows float32; the value itself is finite
    opt.step()
    assert g.skipped == 0 and g.steps == 1


def test_a_watch_records_the_skipped_step_as_a_step_with_its_fault():
    """The guard skips without calling the optimizer, so no step hook runs: the watch must still
    end that step (with its NaN gradient and loss) instead of merging it into the next one."""
    import gradwatch

    model, opt = setup()
    g = guard(opt)
    losses = []
    with gradwatch.watch(model, opt, warn=False) as w, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(8):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 2, generator=gen)
            if step == 5:
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            losses.append(loss.item())
            opt.step()
        series = w.series()
    assert g.skipped == 1
    assert len(series.steps) == 8 and series.meta["guard_skipped_steps"] == [5]
    finite = [i for i in range(8) if i != 5]
    assert series.loss[finite] == pytest.approx([losses[i] for i in finite])
    assert not np.isfinite(series.loss[5]) and (series.metrics["nonfinite"][5] > 0).any()
    assert np.nansum(series.metrics["nonfinite"][finite]) == 0  # NaN: the Tanh has no parameters
    assert any(f.kind == "non_finite" for f in w.findings())


def test_sparse_gradients_are_checked():
    model = nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(24, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = guard(opt)
    ids = torch.tensor([[1, 1, 2], [3, 1, 5]])
    nn.functional.cross_entropy(model(ids), torch.tensor([0, 2])).backward()
    opt.step()
    model[0].weight.grad = torch.sparse_coo_tensor([[1]], torch.full((1, 8), float("nan")), (20, 8))
    before = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert (g.steps, g.skipped) == (1, 1) and torch.equal(before, model[0].weight)


def test_restore_after_add_param_group():
    """Before, the restore zipped the current parameters against the snapshot's list and loaded the
    old ``optimizer.state_dict()``: after ``add_param_group`` that raised "loaded state dict has a
    different number of parameter groups", with some weights already rolled back."""
    model, _ = setup()
    opt = torch.optim.Adam(model[2].parameters(), lr=0.01)  # the head first, then the body (fine-tuning)
    g = guard(opt, patience=2)
    for step in range(3):
        backward(model, step), opt.step()
    opt.add_param_group({"params": model[0].parameters(), "lr": 0.001})
    backward(model, 3)
    saved = state_copy(model, opt)  # the first good step with the new group retakes the snapshot
    opt.step()
    for step in range(4, 6):
        backward(model, step), opt.step()
    with pytest.warns(UserWarning, match="restored to good step 3; lr"):
        for step in range(6, 8):
            backward(model, step, poison=True), opt.step()
    assert g.restores == 1
    assert_same(state_copy(model, opt), saved)
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([0.005, 0.0005])


def test_restore_before_a_good_step_with_the_new_group():
    """Bad steps right after ``add_param_group``: the snapshot holds only the old parameters. They
    are restored; the new ones, never stepped since, are left as they are (before: a crash)."""
    model, _ = setup()
    opt = torch.optim.Adam(model[2].parameters(), lr=0.01)
    g = guard(opt, patience=2)
    saved = state_copy(model, opt)  # the snapshot of good step 0, before its update
    for step in range(3):
        backward(model, step), opt.step()
    opt.add_param_group({"params": model[0].parameters(), "lr": 0.001})
    body = [p.detach().clone() for p in model[0].parameters()]
    with pytest.warns(UserWarning, match=r"restored to good step 0 \(2 parameter\(s\) not in that snapshot"):
        for step in range(3, 5):
            backward(model, step, poison=True), opt.step()
    assert g.restores == 1 and opt.state_dict()["state"] == {}  # Adam had no state at step 0
    assert all(torch.equal(a, b) for a, b in zip(body + saved[0][2:], model.parameters()))
    backward(model, 5), opt.step()  # training goes on, every parameter stepped
    assert g.steps == 4 and len(opt.state_dict()["state"]) == 4


def make_scheduler(name: str, opt: torch.optim.Optimizer):
    sched = torch.optim.lr_scheduler
    return {"OneCycleLR": lambda: sched.OneCycleLR(opt, max_lr=0.1, total_steps=30),
            "LambdaLR": lambda: sched.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
            "StepLR": lambda: sched.StepLR(opt, step_size=3, gamma=0.5),
            "CosineAnnealingLR": lambda: sched.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)}[name]()


def scheduled_lrs(name: str, how: str | None, bad=(4, 5)) -> list[float]:
    """The lr after each of 16 scheduler steps; `how` None: no guard; else how the guard learns of the
    scheduler ("given" to gw.guard, "added" after it, "unknown")."""
    model, opt = setup(lr=0.1)
    g = guard(opt, patience=2, lr_factor=0.5) if how in ("added", "unknown") else None
    sched = make_scheduler(name, opt)
    if how == "given":
        g = guard(opt, patience=2, lr_factor=0.5, scheduler=sched)
    if how == "added":
        g.add_scheduler(sched)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(16):
            backward(model, step, poison=g is not None and step in bad)
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    assert g is None or g.restores == 1
    return lrs


@pytest.mark.parametrize("name, how", [("OneCycleLR", "given"), ("LambdaLR", "given"), ("StepLR", "given"),
                                       ("CosineAnnealingLR", "given"), ("LambdaLR", "added"),
                                       ("OneCycleLR", "unknown"), ("StepLR", "unknown")])
def test_lr_cut_survives_the_scheduler(name, how):
    """Before, only group["lr"] was cut: OneCycleLR (lr from the group's initial/max/min lr) and
    LambdaLR (lr from its base_lrs) set the uncut lr again at their next step."""
    reference = scheduled_lrs(name, None)
    lrs = scheduled_lrs(name, how)
    assert lrs[:5] == pytest.approx(reference[:5])  # the restore is at step 5
    assert lrs[5:] == pytest.approx([0.5 * lr for lr in reference[5:]])
    assert len(set(reference[5:])) > 3  # the schedule does move the lr after the restore


def test_restore_warning_says_an_unknown_scheduler_may_undo_the_cut():
    model, opt = setup(lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    guard(opt, patience=1)
    backward(model, 0, poison=True)
    with pytest.warns(UserWarning, match=r"not given to gw.guard\(scheduler=...\).*its next step undoes the cut"):
        opt.step()


def test_numpy_integers_are_whole_numbers():
    _, opt = setup()
    g = guard(opt, patience=np.int64(2), snapshot_every=np.int32(10), lr_factor=np.float32(0.5))
    assert (g.patience, g.snapshot_every, g.lr_factor) == (2, 10, 0.5) and type(g.patience) is int


def test_guarding_twice_is_refused_until_the_first_is_removed():
    """Before, a second guard wrapped the first: both counted every good step (2 steps reported for
    one) and only the outer one saw a skip, so the two reports disagreed."""
    model, opt = setup()
    first = guard(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)  # re-wraps optimizer.step after the guard
    with pytest.raises(ConfigError, match="already guarded"):
        guard(opt)
    first.remove()
    second = guard(opt)
    backward(model, 0), opt.step(), sched.step()
    backward(model, 1, poison=True)
    with pytest.warns(UserWarning, match="skipped"):
        opt.step()
    assert (first.steps, first.skipped) == (0, 0) and (second.steps, second.skipped) == (1, 1)


@pytest.mark.parametrize("first_step_bad, second_scheduler", [(False, False), (True, False), (True, True)])
def test_guard_built_after_the_scheduler_raises_no_torch_warning(first_step_bad, second_scheduler):
    """Before, the usual order (scheduler, then guard) made torch's first scheduler.step() warn that
    "optimizer.step() has been overridden after learning rate scheduler initialization"; a false
    alarm, since the guard calls the scheduler's wrapped step. A second scheduler built after the
    guard must not warn either, and both must still see the steps."""
    model, opt = setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    g = guard(opt)
    if second_scheduler:  # built after the guard: it finds the step already marked as wrapped
        later = torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda epoch: 0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            backward(model, step, poison=first_step_bad and step == 0)
            opt.step(), sched.step()
            if second_scheduler:
                later.step()
    assert [str(w.message) for w in caught if "gradwatch" not in str(w.message)] == []
    assert g.skipped == int(first_step_bad) and g.steps == 3 - int(first_step_bad)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (0.5 * (0.9 if second_scheduler else 1.0)) ** 3)


@pytest.mark.parametrize("scheduler", [None, "before", "after"])
def test_guard_warnings_point_at_the_users_step_call(scheduler):
    """Before, with an LR scheduler built before or after the guard, the skip and restore warnings
    named gradwatch's or torch's files (the wrapped step, the scheduler's wrapper), not the line of
    the training script that called optimizer.step()."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make = lambda: torch.optim.lr_scheduler.StepLR(opt, 5)  # noqa: E731
    sched = make() if scheduler == "before" else None
    g = guard(opt, patience=2)
    sched = make() if scheduler == "after" else sched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            (model(torch.randn(2, 3)).sum() * float("nan")).backward()
            opt.step()
            if sched is not None:
                sched.step()
    ours = [w for w in caught if "gradwatch.guard" in str(w.message)]
    assert len(ours) == 2 and g.restores == 1
    assert [w.filename for w in ours] == [__file__, __file__]


@pytest.mark.parametrize("make, by_keyword", [(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False),
                                              (lambda ps: torch.optim.Adam(ps, lr=0.01), True)])
def test_closure_steps_of_torchs_single_call_optimizers_are_guarded(make, by_keyword):
    """Before, every optimizer.step(closure) was passed through unchecked, so a NaN loss in a closure
    (Lightning calls every step that way) reached the weights of a guarded SGD or Adam. They run the
    closure once before updating: the guard now runs it, checks, and skips; a finite run is bit for
    bit the unguarded one, and the step still returns the closure's loss."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))

    def train(guarded: bool):
        model, _ = setup()
        opt = make(model.parameters())
        g = guard(opt) if guarded else None
        losses = []
        for step in range(5):
            def closure():
                opt.zero_grad()
                loss = model(x).square().mean() * (float("nan") if guarded and step == 2 else 1.0)
                loss.backward()
                return loss
            losses.append(opt.step(closure=closure) if by_keyword else opt.step(closure))
        return model, opt, g, losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, g, losses = train(True)
    assert g.skipped == 1 and g.steps == 4 and g.passed_through == 0 and torch.isnan(losses[2])
    _, _, _, twin_losses = train(False)
    assert [float(l) for l in losses[:3]] != [float(l) for l in twin_losses[:3]]  # the NaN step, only
    assert [float(l) for l in losses[:2]] == [float(l) for l in twin_losses[:2]]
    reference = setup()[0]
    ref_opt = make(reference.parameters())
    for step in range(4):  # the guarded run's four good steps, unguarded
        ref_opt.zero_grad()
        reference(x).square().mean().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lbfgs_bad_steps_in_a_row_restore_and_cut_the_lr():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    g = Guard(opt, patience=2)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure(bad: bool):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * (float("inf") if bad else 1.0)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bad in (False, True, True):
            opt.step(lambda: closure(bad))
    assert (g.skipped, g.restores, opt.param_groups[0]["lr"]) == (2, 1, 0.25)
    assert all(bool(p.isfinite().all()) for p in model.parameters())

