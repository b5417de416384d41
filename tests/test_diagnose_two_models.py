"""A GAN's generator and discriminator are diagnosed as a depth each: a tester's WGAN-GP generator
(10 Linear + Sigmoid, found after its critic) had ∂L/∂s 1e-9 lower at its input and no finding, the
critic's first layer standing as the lowest of one profile across both."""

from __future__ import annotations

import dataclasses

import numpy as np

from gradwatch.diagnose import diagnose
from series_builder import build, kinds, sampled


def _gan(models: list[str] | None, own_loss: bool = True):
    run = build(depth=7, activation="sigmoid")
    names = {f"fc{i}": ("" if i < 2 else "G.") + f"{2 * (i % 2 if i < 2 else i - 2)}" for i in range(7)}
    names |= {f"act{i}": ("" if i < 2 else "G.") + f"{2 * (i if i < 2 else i - 2) + 1}" for i in range(6)}
    rows = sampled(run)
    g0 = run.column("fc2")  # the generator's first layer
    run.metrics["grad_out_rms"][rows, g0] = 1e-11
    run.layers = [dataclasses.replace(l, name=names[l.name]) for l in run.layers]
    run.meta["own_loss_steps"] = [1] if own_loss else []
    if models is not None:
        run.meta["models"] = models
    return run


def test_the_generator_vanishing_behind_its_discriminator_is_found_in_it():
    f = next(f for f in diagnose(_gan(["", "G"])) if f.kind == "vanishing_gradient")
    assert f.layers[0] == "G.0"
    assert "vanishing_gradient" not in kinds(diagnose(_gan(None)))  # one profile: the finding was lost


def test_models_trained_by_one_loss_stay_one_chain():
    """An encoder and decoder called apart by one loss: the gradient flows through both, one depth."""
    run = _gan(["", "G"], own_loss=False)
    parts = [f.layers for f in diagnose(run) if f.kind == "vanishing_gradient"]
    assert parts == [f.layers for f in diagnose(_gan(None, own_loss=False)) if f.kind == "vanishing_gradient"]


def test_a_finding_of_the_whole_run_is_said_once_with_the_layer_it_began_in():
    """A NaN in one model was kept from the other model's part, which names no layer: "first
    appears in the loss" (a reviewer's GAN, its NaN in the discriminator's real batch)."""
    run = _gan(["", "G"])
    rows = np.flatnonzero(~np.isnan(run.metrics["weight_norm"][:, run.column("0")]))
    run.loss[rows[4]:] = np.inf
    run.metrics["act_mean"][rows[4]:, run.column("G.1")] = np.inf  # the second model's first activation
    run.metrics["grad_norm"][rows[4]:] = np.inf
    found = [f for f in diagnose(run) if f.kind == "non_finite"]
    assert len(found) == 1 and found[0].layers[:2] == ("G.0", "G.1")


def test_each_phase_keeps_its_own_findings_of_the_whole_run():
    """An lr sweep, one model after another: the second run's NaN was merged into the first's."""
    run = _gan(["", "G"])
    run.meta["phase_starts"] = [50]
    run.loss[20:50] = np.inf
    run.loss[70:] = np.inf
    assert [f.first_step for f in diagnose(run) if f.kind == "non_finite"] == [20, 70]


def test_zero_code_finds_a_wgan_generator_first_run_under_no_grad(tmp_path):
    """WGAN's recipe: the critic steps 5 times per generator step, on fakes made under no_grad; the
    generator first runs with gradients after the discovery's 2 steps, and was never watched."""
    import torch
    from torch import nn

    from gradwatch.collect.auto import AutoWatch

    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    D = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-4) for m in (G, D))
    watch = AutoWatch(str(tmp_path), warn=False)
    try:
        for _ in range(3):
            for _ in range(5):
                with torch.no_grad():
                    fake = G(torch.randn(16, 4))
                loss_d = D(fake).mean() - D(torch.randn(16, 2)).mean()
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
            loss_g = -D(G(torch.randn(16, 4))).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
    finally:
        watch.detach()
    run = watch.stored_series()
    assert run.meta["models"] == ["", "G"] and {"G.0", "G.2"} <= set(run.layer_names())
    assert np.isfinite(run.metrics["grad_norm"][:, run.column("G.0")]).any()


def test_a_phase_holding_one_model_of_a_gan_run_is_diagnosed_without_error():
    """A classifier, then a GAN: the classifier's phase holds one model's layers, one part that is not
    the phase itself, and comparing the two raised inside the live check, killing the training."""
    run = build()
    run.meta.update(models=["", "G"], own_loss_steps=[60])
    assert isinstance(diagnose(run), list)


def test_a_failing_rule_never_stops_the_training_it_watches(monkeypatch, capsys):
    import torch
    from torch import nn

    import gradwatch as gw
    from gradwatch.diagnose import live

    def broken(series):
        raise ValueError("a rule's bug")

    monkeypatch.setattr(live, "diagnose", broken)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, flush_every=5, status=False) as watch:
        for _ in range(20):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert watch.step == 20
    assert capsys.readouterr().err.count("the live diagnosis failed (ValueError: a rule's bug)") == 1


def test_a_generator_that_ran_first_is_judged_against_the_discriminator_above_it():
    """A tester's DCGAN, the generator found first: its loss flows back through the discriminator,
    whose layers stand above it in one depth. Diagnosed as a model alone, its vanishing (1e-8 at
    its input against 1e-6 at its top, 1e-4 in the discriminator) was missed."""
    run = build(depth=7, activation="sigmoid")
    rows = sampled(run)
    rename = {f"fc{i}": f"D.{2 * (i - 5)}" if i >= 5 else f"{2 * i}" for i in range(7)}
    rename |= {f"act{i}": f"D.{2 * (i - 5) + 1}" if i >= 5 else f"{2 * i + 1}" for i in range(6)}
    for name, value in {**{f"fc{i}": 1e-6 for i in range(1, 5)}, "fc0": 1e-8, "fc5": 1e-4, "fc6": 1e-4}.items():
        run.metrics["grad_out_rms"][rows, run.column(name)] = value
    run.layers = [dataclasses.replace(l, name=rename[l.name]) for l in run.layers]
    run.meta.update(models=["", "D"], own_loss_steps=[1])
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.layers[0] == "0"
    assert len([f for f in diagnose(run) if f.kind == "vanishing_gradient"]) == 1  # said once
