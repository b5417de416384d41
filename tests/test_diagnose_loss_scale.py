"""An exploding gradient whose loss is huge before any update: the loss's scale is the cause, and
bringing it to order 1 the first remedy (a tenfold lower learning rate is nowhere near enough)."""

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from gradwatch.diagnose.advice import LARGE_INITIAL_LOSS
from series_builder import build, sampled


def _overshooting(first_loss: float, optimizer: str = "SGD"):
    """A first update 50x the weights and a gradient 1000x its level from step 60 on, with
    `first_loss` at step 0."""
    run = build(optimizer=optimizer)
    run.metrics["update_ratio"][sampled(run)[0], run.column("fc2")] = 50.0
    run.metrics["grad_norm"][60:] *= 1e3
    run.metrics["update_ratio"][60:] *= 1e3  # lr·g grows with g (a fixed-length step would be clipping)
    run.loss[0] = first_loss
    return next(f for f in diagnose(run) if f.kind == "exploding_gradient")


def test_a_huge_first_loss_puts_the_loss_scale_first():
    f = _overshooting(2 * LARGE_INITIAL_LOSS)
    assert f.causes[0].startswith("loss scale:") and f"{2 * LARGE_INITIAL_LOSS:.3g}" in f.causes[0]
    assert f.remedies[0].action.startswith("Bring the loss to order 1") and f.remedies[0].action in f.message
    # Adam's step does not scale with the loss: not its cause there
    f = _overshooting(2 * LARGE_INITIAL_LOSS, "Adam")
    assert f.evidence.get("growth_over_steps") and not any(c.startswith("loss scale") for c in f.causes)
    # just below the bar, or a loss already non-finite at step 0: the learning rate stays first
    for loss in (0.5 * LARGE_INITIAL_LOSS, float("inf")):
        f = _overshooting(loss)
        assert f.causes[0].startswith("learning rate:") and not any(c.startswith("loss scale") for c in f.causes)


def _train(scale: float, steps: int = 12):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.watch(model, opt, warn=False)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) * scale
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    found = watch.findings()
    watch.detach()
    return found, losses


def test_a_loss_scaled_up_a_million_times_is_told_to_scale_it_back_and_that_works():
    found, losses = _train(1e6)
    f = next(f for f in found if f.kind == "exploding_gradient")
    assert f.first_step == 0 and f.causes[0].startswith("loss scale:")
    assert abs(float(f.causes[0].split("the loss is ")[1].split(" ")[0]) - losses[0]) <= 1e-3 * losses[0]
    found, losses = _train(1.0)  # the remedy as said: no constant factor
    assert [f for f in found if f.severity != "info"] == [] and losses[-1] < losses[0]


def test_a_nan_after_growth_from_a_huge_first_loss_names_the_loss_scale_first():
    """A tester's regression on targets x10 under SGD at 3e-3: NaN at step 9, told only to lower the
    lr tenfold and clip at 1.0; both pasted, the loss stayed at 9.9e6."""
    import numpy as np

    def nan_after_growth(first_loss: float, optimizer: str = "SGD"):
        run = build(optimizer=optimizer)
        run.metrics["grad_norm"][:40] *= np.geomspace(1, 1e4, 40)[:, None]  # growing before the NaN
        run.loss[40:] = np.inf
        run.metrics["grad_norm"][40:] = np.inf
        run.loss[0] = first_loss
        return next(f for f in diagnose(run) if f.kind == "non_finite")

    f = nan_after_growth(9.8e6)
    assert f.causes[0].startswith("loss scale:") and f.remedies[0].action.startswith("Bring the loss to order 1")
    assert any(c.startswith("learning rate:") for c in f.causes)  # still named, after it
    for g in (nan_after_growth(9.8e6, "Adam"), nan_after_growth(2.3)):
        assert not any(c.startswith("loss scale") for c in g.causes)
