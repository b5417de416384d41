"""Training genres beyond the plain classifier loop, run for real: what the rules must and must not
say about them (L-BFGS with a closure, a block of shared weights applied many times...)."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose


def lbfgs_run(watched: bool, steps: int = 15):
    """A tanh MLP fitted on one full batch by L-BFGS with a strong-Wolfe line search: the loss
    falls to ~1e-7 within ten steps, then L-BFGS's own convergence test stops every update."""
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    y = (x @ torch.randn(16, 4)).argmax(1)  # a linear teacher: separable, the loss can reach ~0
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=5, line_search_fn="strong_wolfe")
    first_grads, losses = [], []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if len(first_grads) == len(losses):  # the step's first call: the gradient at its weights
            first_grads.append([float(m.weight.grad.norm() ** 2 + m.bias.grad.norm() ** 2) ** 0.5
                                for m in (model[0], model[2])])
        return loss

    watch = gw.watch(model, opt, warn=False) if watched else None
    for _ in range(steps):
        losses.append(opt.step(closure).item())
    run = watch.series() if watched else None
    if watched:
        watch.detach()
    return run, losses, first_grads, [p.detach().clone() for p in model.parameters()]


def test_lbfgs_converging_on_a_full_batch_is_healthy():
    run, losses, grads, weights = lbfgs_run(True)
    plain = lbfgs_run(False)
    assert losses == plain[1] and all(torch.equal(a, b) for a, b in zip(weights, plain[3]))
    assert losses[-1] < 1e-4 * losses[0]  # it learnt, and stopped: the later steps change nothing
    assert len(run.steps) == len(losses) and list(run.loss) == losses
    for layer, j in (("0", 0), ("2", 1)):  # each step's gradient is the closure's first call's
        recorded = run.series(layer, "grad_norm")[1]
        assert len(recorded) == len(grads) and max(abs(a - g[j]) / g[j] for a, g in zip(recorded, grads)) < 1e-5
    found = diagnose(run)
    # its first step, 2.6x the weights, is the line search's length, not an exploding gradient;
    # the weights stop once converged, which is no stall; the tanh units it saturated still let the
    # loss fall from 0.2 to 1e-7 (it fell before the sample that saw them): not a warning
    assert not [f for f in found if f.severity != "info"], [f.line() for f in found]
    for f in found:  # and no advice to lower L-BFGS's lr, whose step length its line search sets
        assert all("learning rate" not in r.action.lower() for r in f.remedies)


def _converged_at(n_steps: int, stop: int, optimizer: str):
    """A run whose every weight stops changing at `stop` (row of samples), its loss flat from then."""
    import numpy as np
    from series_builder import build, sampled

    run = build(n_steps=n_steps, optimizer=optimizer, lr=1.0)
    rows = sampled(run)
    for c in (run.column(f"fc{i}") for i in range(5)):
        run.metrics["update_ratio"][rows[stop:], c] = 0.0
    run.loss[rows[stop]:] = run.loss[rows[stop]]
    return run, np, rows


def test_lbfgs_stopped_by_its_own_convergence_test_is_not_stalled():
    run, _, _ = _converged_at(100, 2, "LBFGS")
    assert "stalled_layers" not in [f.kind for f in diagnose(run)]
    # the same stop under SGD (lr 1 > 0, gradients arriving) is weights that stopped changing
    run, _, _ = _converged_at(100, 2, "SGD")
    assert "stalled_layers" in [f.kind for f in diagnose(run)]
    # and under L-BFGS, one layer stopping while the others move is no convergence
    run, np, rows = _converged_at(100, 2, "LBFGS")
    run.metrics["update_ratio"][rows, run.column("fc3")] = 1e-3
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert f.severity == "error" and "fc0" in f.layers


def test_saturation_is_weighed_against_the_loss_since_the_last_sample_without_it():
    """The units saturated somewhere after the last sample that did not show it. Full-batch L-BFGS
    took its loss from 2.3 to 3e-7 between the samples at steps 0 and 10, saturating 78% of a tanh
    layer on the way: weighed from step 10, where the loss was already at its end, it was a
    warning ("almost no gradient passes") on a run that had learnt everything."""
    from series_builder import build, sampled

    run = build(n_steps=40, activation="tanh", optimizer="LBFGS", lr=1.0)
    rows = sampled(run)
    run.loss[:] = 3e-7
    run.loss[:8] = [2.3, 1.1, 0.19, 0.02, 1e-3, 3e-5, 1e-6, 3e-7]
    run.metrics["saturated"][rows[1]:, run.column("act1")] = 0.78
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert f.severity == "info" and f.first_step == 10
    assert not any("learning rate" in r.action.lower() for r in f.remedies)  # L-BFGS sets its step length
    # a loss that did not fall from the last unsaturated sample on stays a warning
    run.loss[:] = 2.3
    assert next(f for f in diagnose(run) if f.kind == "saturation").severity != "info"


class SharedBlock(nn.Module):
    """One Linear block applied `repeats` times per forward (shared weights): two hidden weight
    layers in the profile, 1 + `repeats` layers deep."""

    def __init__(self, act=nn.Sigmoid, repeats=10):
        super().__init__()
        self.inp, self.block, self.act, self.out = nn.Linear(16, 32), nn.Linear(32, 32), act(), nn.Linear(32, 4)
        self.repeats = repeats

    def forward(self, x):
        h = self.act(self.inp(x))
        for _ in range(self.repeats):
            h = self.act(self.block(h))
        return self.out(h)


def _shared_run(act, repeats):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model = SharedBlock(act, repeats)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(31):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return w.series()


def test_a_sigmoid_block_applied_ten_times_vanishes_though_the_profile_has_two_hidden_layers():
    """The lower layer got 4e-8 of the block's ∂L/∂s; with three weight layers in all the profile
    was too short to judge, and the run was told to raise its learning rate (the plateau) and to
    use Adam (stalled). A drop of six decades across two layers is depth the profile cannot see."""
    run = _shared_run(nn.Sigmoid, 10)
    rms = {n: run.series(n, "grad_out_rms")[1][-1] for n in ("inp", "block")}
    assert rms["inp"] / rms["block"] < 1e-6  # measured, not assumed
    v = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert v.layers[0] == "inp" and v.causes[0].startswith("saturating activation")
    assert "stalled_layers" not in [f.kind for f in diagnose(run)]  # folded into the vanishing one
    # the same net applied once, with ReLU, is a healthy three-layer net
    assert "vanishing_gradient" not in [f.kind for f in diagnose(_shared_run(nn.ReLU, 1))]


def test_two_hidden_layers_are_judged_only_beyond_the_short_profile_ratio():
    from series_builder import build, sampled

    th = gw.Thresholds()
    for ratio, found in ((th.short_profile_ratio * 2, False), (th.short_profile_ratio / 2, True)):
        run = build(depth=3)  # fc0, fc1 hidden; fc2 the output
        run.metrics["grad_out_rms"][sampled(run), run.column("fc0")] = 0.01 * ratio
        assert ("vanishing_gradient" in [f.kind for f in diagnose(run)]) is found, ratio


class _ZeroBackward(torch.autograd.Function):
    """A clamp whose hand-written backward has its mask inverted: it passes back zeros."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() > 1e6).to(g.dtype)


def test_a_custom_function_passing_back_zeros_is_one_finding_that_names_it():
    """Its layer below got exactly 0: said twice, as a vanishing gradient (ratio 0, "initialise
    for the activation") and as dead units; a zero is a block, not a geometric decay."""
    torch.manual_seed(0)
    l1, l2, l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
    model = nn.ModuleDict({"l1": l1, "l2": l2, "l3": l3})
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(31):
            opt.zero_grad()
            nn.functional.cross_entropy(l3(torch.relu(l2(_ZeroBackward.apply(l1(x))))), y).backward()
            assert float(l1.weight.grad.abs().max()) == 0.0 and float(l2.weight.grad.abs().max()) > 0
            opt.step()
        found = diagnose(w.series())
    about_l1 = [f for f in found if "l1" in f.layers]
    assert [f.kind for f in about_l1] == ["dead_units"], [f.line() for f in found]
    assert any("autograd.Function" in c for c in about_l1[0].causes)


def test_layers_slowed_by_their_own_param_groups_lr_are_not_stalled():
    """Discriminative fine-tuning: the lower layers' group at lr/1000 on purpose. Their updates,
    1000x smaller, were a stalled_layers warning blaming "one learning rate for layers whose
    gradients differ by orders of magnitude". Updates are compared per unit of learning rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                          nn.ReLU(), nn.Linear(32, 4))
    low = [*model[0].parameters(), *model[2].parameters()]
    opt = torch.optim.Adam([{"params": low, "lr": 1e-6}, {"params": [*model[4].parameters(), *model[6].parameters()]}],
                           lr=1e-3)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(41):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        run = w.series()
    u = {n: run.series(n, "update_ratio")[1][-1] for n in ("0", "6")}
    assert u["0"] < 1e-2 * u["6"]  # measured: 1000x smaller updates
    assert "stalled_layers" not in [f.kind for f in diagnose(run)]
    assert run.meta["lr_scale"] == {"0": 1e-3, "2": 1e-3, "4": 1.0, "6": 1.0}
    # a layer stalled beyond its own learning rate still is
    rows = run.series("0", "update_ratio")[0]
    run.metrics["update_ratio"] = run.metrics["update_ratio"].copy()
    run.metrics["update_ratio"][np.isin(run.steps, rows), run.column("0")] *= 1e-3
    assert "0" in next(f for f in diagnose(run) if f.kind == "stalled_layers").layers


def test_gradients_no_optimizer_uses_piling_up_are_no_exploding_gradient():
    """Fine-tuning the head alone after training everything, the backbone left requires_grad:
    the head's optimizer clears only the head's gradients, so the backbone's add up step after
    step (its recorded norm is what .grad holds, rightly). Counted in the total norm they were an
    exploding_gradient error, with "lower the learning rate" as its first remedy."""
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, 4)
    model = nn.Sequential(backbone, head)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    held = []
    with gw.watch(model, torch.optim.SGD(model.parameters(), lr=0.05), warn=False) as w:
        for opt, steps in ((w._optimizer, 20), (torch.optim.Adam(head.parameters(), lr=1e-3), 40)):
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                held.append(float(backbone[0].weight.grad.norm() ** 2 + backbone[0].bias.grad.norm() ** 2) ** 0.5)
                opt.step()
        run = w.series()
    recorded = run.series("0.0", "grad_norm")[1]
    # Adam, made before training began, defines the step from its second step on (its first is
    # merged into it: until then it may be a partner stepping beside SGD, as a GAN's does)
    np.testing.assert_allclose(recorded, held[:20] + held[21:], rtol=1e-5)
    assert recorded[-1] > 10 * recorded[20]  # piled up, as .grad holds them
    assert run.meta["optimizer_stopped"] == [[20, ["0.0", "0.2"]]]  # only SGD trained the backbone
    assert "exploding_gradient" not in [f.kind for f in diagnose(run)], [f.line() for f in diagnose(run)]


def test_an_all_zero_net_is_told_its_init_not_an_explosion():
    """Weights all 0: tanh(0) = 0 keeps the output layer's weight at 0, its norm is its bias wandering
    near 0, and an update of 1.3x that norm (step 54) read as an exploding gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    for p in model.parameters():
        nn.init.zeros_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(100):
            x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        run = w.series()
    assert np.nanmax(run.metrics["update_ratio"][:, run.column("4")]) > 1  # the ratio is there to be misread
    found = {f.kind for f in gw.diagnose(run)}
    assert "dead_units" in found and "exploding_gradient" not in found


def test_lbfgs_whose_first_step_took_the_whole_fall_is_no_plateau():
    """A convex fit by full-batch L-BFGS: 2.35 at step 0, 0.36 from step 1, converged. The plateau
    rule's start, a median of the first window, read 0.3575: 'has not improved, raise the lr
    tenfold, try Adam' on a run at 95% accuracy."""
    from series_builder import build

    run = build(n_steps=60, optimizer="LBFGS", lr=1.0)
    run.loss[:] = 0.3569 + 1e-4 * np.random.default_rng(0).random(60)
    run.loss[0] = 2.348
    assert "loss_plateau" not in [f.kind for f in diagnose(run)]
    run.loss[0] = run.loss[1]  # flat from its first step: a plateau still
    assert "loss_plateau" in [f.kind for f in diagnose(run)]
