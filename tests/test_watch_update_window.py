"""The update ratio ‖Δw‖/‖w‖ of each step, against brute force: the weights copied in float64 before
and after each iteration of the loop, whatever optimizers step in it, in whatever order."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.collect.auto import AutoWatch


def _mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _owners(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    return {name: list(m.parameters(recurse=False)) for name, m in model.named_modules()
            if list(m.parameters(recurse=False))}


def _weights(owners: dict) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p.detach().double().flatten() for p in ps]) for name, ps in owners.items()}


def _truth(owners: dict, before: dict, after: dict) -> dict[str, float]:
    """Each layer's ‖w_after − w_before‖ / ‖w_before‖, in float64."""
    return {n: (torch.linalg.vector_norm(after[n] - before[n]) / torch.linalg.vector_norm(before[n])).item()
            for n in owners}


def _run(model: nn.Module, optimizer, body, iterations: int = 7, sample_every: int = 1, zero_code=None):
    """Runs `body(i)` under gw.watch(model, optimizer) (`zero_code`: a run directory for zero-code
    mode instead); the stored update ratios by step, and the true ones of each iteration that
    changed the weights (a skipped step changes none)."""
    owners = _owners(model)
    truths = []
    watch = AutoWatch(str(zero_code), sample_every=sample_every, warn=False) if zero_code \
        else gw.watch(model, optimizer, sample_every=sample_every, warn=False)
    with watch:
        for i in range(iterations):
            before = _weights(owners)
            body(i)
            after = _weights(owners)
            if any(not torch.equal(before[n], after[n]) for n in owners):
                truths.append(_truth(owners, before, after))
        run = watch.series()
    assert len(run.steps) == len(truths)
    compared = 0
    for row, truth in enumerate(truths):
        sampled = run.steps[row] % sample_every == 0
        for name, ratio in truth.items():
            stored = run.metrics["update_ratio"][row, run.column(name)]
            if math.isnan(run.metrics["grad_norm"][row, run.column(name)]):
                # no kept backward reached it (a GAN's generator under a watch with D's optimizer)
                assert math.isnan(stored), (int(run.steps[row]), name)
            elif sampled:
                assert stored == pytest.approx(ratio, rel=1e-4, abs=1e-9), (int(run.steps[row]), name)
                compared += 1
            else:
                assert math.isnan(stored), (int(run.steps[row]), name)
    sampled_rows = sum(1 for s in run.steps if s % sample_every == 0)
    assert compared >= sampled_rows * len(owners) / 2  # (at least the watched optimizer's layers)
    return run


@pytest.mark.parametrize("sample_every", [1, 3])
def test_one_optimizer(sample_every):
    torch.manual_seed(0)
    model, x = _mlp(4, 8, 8, 2), torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def body(i):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    _run(model, opt, body, sample_every=sample_every)


@pytest.mark.parametrize("zero_code", [False, True])
@pytest.mark.parametrize("sample_every", [1, 3])
@pytest.mark.parametrize("order", ["watched_first", "partner_first"])
def test_two_optimizers_on_two_parts_in_either_order(order, sample_every, zero_code, tmp_path):
    """One backward, then each part's optimizer: the partner's update belongs to the iteration's
    step whichever steps first (it fell in the next step's window when it stepped second). In
    zero-code mode the first optimizer seen stepping is the watched one."""
    torch.manual_seed(0)
    model, x = _mlp(4, 8, 8, 2), torch.randn(16, 4)
    watched = torch.optim.SGD(model[:2].parameters(), lr=0.1)
    partner = torch.optim.Adam(model[2:].parameters(), lr=1e-2)
    order_ = [watched, partner] if order == "watched_first" else [partner, watched]

    def body(i):
        for o in order_:
            o.zero_grad()
        model(x).pow(2).mean().backward()
        for o in order_:
            o.step()
    _run(model, watched, body, sample_every=sample_every, zero_code=zero_code and tmp_path)


@pytest.mark.parametrize("sample_every", [1, 3])
@pytest.mark.parametrize("watched", ["D", "G"])
def test_a_gan_with_two_backwards(watched, sample_every):
    """D's backward and step, then G's backward (through D) and step, under a watch of both models
    with either optimizer."""
    torch.manual_seed(0)
    gan = nn.ModuleDict({"G": _mlp(4, 8, 2), "D": _mlp(2, 8, 1)})
    oG, oD = torch.optim.SGD(gan["G"].parameters(), 0.05), torch.optim.Adam(gan["D"].parameters(), 1e-2)
    bce = nn.BCEWithLogitsLoss()
    real = torch.randn(16, 2) + 2

    def body(i):
        fake = gan["G"](torch.randn(16, 4))
        lD = bce(gan["D"](real), torch.ones(16, 1)) + bce(gan["D"](fake.detach()), torch.zeros(16, 1))
        oD.zero_grad(), lD.backward(), oD.step()
        oG.zero_grad(), bce(gan["D"](fake), torch.ones(16, 1)).backward(), oG.step()
    _run(gan, oD if watched == "D" else oG, body, sample_every=sample_every)


@pytest.mark.parametrize("sample_every", [1, 3])
def test_an_actor_critic_whose_critic_steps_first_on_its_own_loss(sample_every):
    """One model, two parts, two losses: the critic's backward reaches the actor's weights too, the
    actor's zero_grad clears them, and the critic's update went to the step before (two at step 0,
    none at the last) under a watch with the actor's optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    actor = torch.optim.SGD(model[0].parameters(), lr=0.1)
    critic = torch.optim.SGD([*model[2].parameters(), *model[4].parameters()], lr=0.1)

    def body(i):
        critic.zero_grad(), model(x).pow(2).mean().backward(), critic.step()
        actor.zero_grad(), model(x).abs().mean().backward(), actor.step()
    _run(model, actor, body, sample_every=sample_every)


@pytest.mark.parametrize("zero_code", [False, True])
@pytest.mark.parametrize("partner", [False, True])
def test_gradient_accumulation(partner, zero_code, tmp_path):
    """Three backwards per step (and a partner stepping after the watched optimizer)."""
    torch.manual_seed(0)
    model, x = _mlp(4, 8, 8, 2), torch.randn(3, 8, 4)
    opt = torch.optim.Adam(model.parameters() if not partner else model[:2].parameters(), lr=1e-2)
    opts = [opt] + ([torch.optim.SGD(model[2:].parameters(), lr=0.1)] if partner else [])

    def body(i):
        for o in opts:
            o.zero_grad()
        for k in range(3):
            (model(x[k]).pow(2).mean() / 3).backward()
        for o in opts:
            o.step()
    _run(model, opt, body, sample_every=2, zero_code=zero_code and tmp_path)


@pytest.mark.parametrize("partner", [False, True])
def test_a_step_the_loss_scaler_skips(partner):
    """Iteration 2's gradients are inf: GradScaler skips the step, which is no step; the steps
    around it keep their own updates."""
    torch.manual_seed(0)
    model, x = _mlp(4, 8, 8, 2), torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters() if not partner else model[:2].parameters(), lr=0.1)
    opts = [opt] + ([torch.optim.SGD(model[2:].parameters(), lr=0.1)] if partner else [])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def body(i):
        for o in opts:
            o.zero_grad()
        loss = model(x).pow(2).mean() * (math.inf if i == 2 else 1.0)
        scaler.scale(loss).backward()
        for o in opts:
            scaler.step(o)
        scaler.update()
    run = _run(model, opt, body)
    assert list(run.steps) == list(range(6))


def _gan_iterations(gan, oG, oD, iterations, on_iteration=lambda: None):
    torch.manual_seed(1)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(iterations):
        fake = gan["G"](torch.randn(16, 4))
        lD = bce(gan["D"](torch.randn(16, 2) + 2), torch.ones(16, 1)) + bce(gan["D"](fake.detach()), torch.zeros(16, 1))
        oD.zero_grad(), lD.backward(), oD.step()
        oG.zero_grad(), bce(gan["D"](fake), torch.ones(16, 1)).backward(), oG.step()
        on_iteration()


def _gan():
    torch.manual_seed(0)
    gan = nn.ModuleDict({"G": _mlp(4, 8, 2), "D": _mlp(2, 8, 1)})
    return gan, torch.optim.SGD(gan["G"].parameters(), 0.05), torch.optim.Adam(gan["D"].parameters(), 1e-2)


def test_zero_code_a_gans_generator_update_is_in_the_step_of_its_gradient(tmp_path):
    """Zero-code mode tells no backward unused: step k+1 holds the generator's backward of
    iteration k (its loss and gradient), and its update with them; the discriminator's is step k's."""
    gan, oG, oD = _gan()
    owners = _owners(gan)
    truths = []
    snap = [_weights(owners)]

    def on_iteration():
        snap.append(_weights(owners))
        truths.append(_truth(owners, snap[-2], snap[-1]))
    with AutoWatch(str(tmp_path), sample_every=1, warn=False) as watch:
        _gan_iterations(gan, oG, oD, 6, on_iteration)
    run = watch.stored_series()
    ratio = run.metrics["update_ratio"]
    for k, truth in enumerate(truths):
        assert ratio[k, run.column("D.0")] == pytest.approx(truth["D.0"], rel=1e-4)
        assert ratio[k + 1, run.column("0")] == pytest.approx(truth["G.0"], rel=1e-4)
    assert math.isnan(ratio[0, run.column("0")])  # no backward of G's in step 0


@pytest.mark.parametrize("watched", ["D", "G"])
def test_watching_a_gan_changes_no_weight(watched):
    """The partner's window (weights kept before its update, a window closed later) reads only."""
    gan, oG, oD = _gan()
    _gan_iterations(gan, oG, oD, 5)
    reference = [p.detach().clone() for p in gan.parameters()]
    gan, oG, oD = _gan()
    with gw.watch(gan, oD if watched == "D" else oG, sample_every=2, warn=False):
        _gan_iterations(gan, oG, oD, 5)
    assert all(torch.equal(p, q) for p, q in zip(gan.parameters(), reference))


def test_every_other_step_and_a_pause_around_steps_not_recorded():
    """every=2, two parts stepping watched-first, and two iterations trained while paused right
    after a sampled step: each recorded step has its own iteration's update, none of the paused ones."""
    torch.manual_seed(0)
    model, x = _mlp(4, 8, 2), torch.randn(16, 4)
    watched, partner = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[2].parameters(), lr=1e-2)
    owners = _owners(model)

    def iteration():
        for o in (watched, partner):
            o.zero_grad()
        model(x).pow(2).mean().backward()
        for o in (watched, partner):
            o.step()
    truths = []
    with gw.watch(model, watched, every=2, sample_every=2, warn=False) as watch:
        for i in range(8):
            before = _weights(owners)
            iteration()
            truths.append(_truth(owners, before, _weights(owners)))
            if i == 4:
                watch.pause()
                iteration(), iteration()
                watch.resume()
        run = watch.series()
    assert list(run.steps) == [0, 2, 4, 6]
    for name in ("0", "2"):
        np.testing.assert_allclose(run.metrics["update_ratio"][:, run.column(name)],
                                   [truths[i][name] for i in (0, 2, 4, 6)], rtol=1e-4)


def test_a_flush_leaves_no_step_behind_without_a_partner():
    """A step's update window stays open for a partner stepping after the step's optimizer; with
    none seen, a flush writes the step it ends, as before (a killed run loses at most the steps
    since the last flush: the DDP run killed at step 25 had 24 stored, not 25)."""
    torch.manual_seed(0)
    model, x = _mlp(4, 8, 2), torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.watch(model, opt, flush_every=5, sample_every=3, warn=False)
    try:
        for _ in range(25):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        assert list(watch.stored_series().steps) == list(range(25))  # step 24: sampled, written
    finally:
        watch.detach()
