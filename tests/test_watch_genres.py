"""Watching training genres beyond one model and one loss: each recorded number checked against
the gradients computed by hand, and the training left exactly as it is without the watch."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose


def _norms(model):
    return [float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in m.parameters())))
            for m in model if isinstance(m, nn.Linear)]


def gan(iterations=40, watched=True, adversarial=True):
    """A GAN stepping its discriminator twice per generator step, each model under its own
    `gw.watch` (adversarial=False: two independent models trained side by side in one loop)."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3)
    bce = nn.BCEWithLogitsLoss()
    watches = (gw.watch(D, opt_d, warn=False), gw.watch(G, opt_g, warn=False)) if watched else ()
    ref = {"D": ([], []), "G": ([], [])}
    for _ in range(iterations):
        for _ in range(2):
            real = torch.randn(32, 2) + 2
            fake = G(torch.randn(32, 4)).detach()
            loss_d = bce(D(real), torch.ones(32, 1)) + bce(D(fake), torch.zeros(32, 1))
            opt_d.zero_grad()
            loss_d.backward()
            ref["D"][0].append(_norms(D)), ref["D"][1].append(loss_d.item())
            opt_d.step()
        z = torch.randn(32, 4)
        loss_g = bce(D(G(z)), torch.ones(32, 1)) if adversarial else G(z).pow(2).mean()
        opt_g.zero_grad()
        loss_g.backward()
        ref["G"][0].append(_norms(G)), ref["G"][1].append(loss_g.item())
        opt_g.step()
    series = {name: w.series() for name, w in zip("DG", watches)}
    for w in watches:
        w.detach()
    weights = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    return series, ref, weights


def test_a_gan_watched_model_by_model_records_each_ones_own_steps_and_loss():
    series, ref, weights = gan()
    _, plain_ref, plain_weights = gan(watched=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights)) and ref == plain_ref
    for name in "DG":
        run, (grads, losses) = series[name], ref[name]
        assert len(run.steps) == len(losses)  # 2 steps of D, 1 of G, per iteration
        np.testing.assert_allclose(run.loss, losses, rtol=1e-6)  # the G step's backward through D is not D's
        recorded = np.stack([run.series(layer, "grad_norm")[1] for layer in ("0", "2")], 1)
        np.testing.assert_allclose(recorded, grads, rtol=1e-5)


def test_a_discriminator_whose_gradients_from_the_generator_loss_go_unused_is_a_rival_objective():
    """The generator's backward reaches D's weights, opt_g steps, and D's gradients are cleared
    unused: D plays against a loss through it, so its own loss is not meant to fall. A
    discriminator at its equilibrium (loss ~2 ln 2 over 600 steps) was told its loss had not
    improved and to raise its learning rate tenfold."""
    series, _, _ = gan()
    assert series["D"].meta["own_loss_steps"] == [2]  # said at D's first step after G's first
    flat = series["D"]
    flat.loss[:] = 2 * np.log(2) + 0.01 * np.random.default_rng(0).standard_normal(len(flat.loss))
    assert not {"loss_plateau", "loss_divergence"} & {f.kind for f in diagnose(flat)}
    # two independent models trained side by side: neither backward reaches the other's weights
    series, _, _ = gan(adversarial=False)
    assert not series["D"].meta["own_loss_steps"] and not series["G"].meta["own_loss_steps"]
    series["D"].loss[:] = flat.loss
    assert "loss_plateau" in {f.kind for f in diagnose(series["D"])}


def test_a_critic_stepping_many_times_per_generator_step_stays_a_partner():
    """A WGAN-style loop, the critic stepped 5 times per generator step, under one watch on both
    models with the generator's optimizer: the critic's optimizer trains other weights than the
    watched one, so it is a partner however often it steps. It had taken the step count over
    (5x the steps) and left the generator's layers without an update."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    D = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    watch = gw.watch(nn.ModuleDict({"G": G, "D": D}), opt_g, warn=False, sample_every=2)
    for _ in range(8):
        for _ in range(5):
            loss_d = D(G(torch.randn(16, 4)).detach()).mean() - D(torch.randn(16, 2) + 2).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        loss_g = -D(G(torch.randn(16, 4))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    run = watch.series()
    watch.detach()
    assert list(run.steps) == list(range(8))
    moved = np.nan_to_num(run.metrics["update_ratio"]) > 0
    weights = [i for i, l in enumerate(run.layers) if l.role == "param"]
    assert all(moved[:, i].any() for i in weights)  # the generator's layers and the critic's
