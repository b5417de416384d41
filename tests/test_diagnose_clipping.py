"""Clipping by norm active on nearly every step is the update rule, not a safety net: a run kept
stable only by it (pre-clip norm 2e4, limit 1) is an exploding_gradient warning that says so;
clipping that triggers rarely, or under Adam, adds nothing."""

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from series_builder import build, sampled

HF_CLIP = "the total norm to 1 (max_grad_norm)"


def _clipped(norm: float, grad_clip: str | None = HF_CLIP, optimizer: str = "SGD", spikes: float = 0.0,
             clip_at: float | None = 1.0):
    """Five layers whose total pre-clip norm is about `norm` (x10 on a `spikes` share of steps),
    each sampled SGD update lr·g clipped by norm at `clip_at` (None: not clipped)."""
    run = build(n_steps=200, optimizer=optimizer)
    rng = np.random.default_rng(1)
    g = run.metrics["grad_norm"]
    g[:] *= norm / np.sqrt(5) * rng.lognormal(0.0, 0.2, len(g))[:, None]  # a minibatch gradient's spread
    g[rng.random(len(g)) < spikes] *= 10
    rows = sampled(run)
    kept = np.minimum(1.0, clip_at / _total(run)[rows, None]) if clip_at else 1.0
    run.metrics["update_ratio"][rows] = run.lr[rows, None] * kept * g[rows] / run.metrics["weight_norm"][rows]
    run.loss[:] = 1.4e5 * (1 + 0.05 * rng.random(len(run.loss)))
    if grad_clip:
        run.meta["grad_clip"] = grad_clip
    return run


def _total(run) -> np.ndarray:
    g = run.metrics["grad_norm"]
    return np.sqrt((g[:, ~np.isnan(g).all(axis=0)].astype(np.float64) ** 2).sum(axis=1))


def _same(a, b) -> bool:
    """The same findings (a message may add that the norms are taken before the trainer's clipping)."""
    key = lambda f: (f.kind, f.severity, f.first_step, f.layers)  # noqa: E731
    return [key(f) for f in a] == [key(f) for f in b]


def test_clipping_on_every_step_far_above_its_limit_is_a_warning_that_says_so():
    run = _clipped(2e4)
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.severity == "warning" and "max_grad_norm" in f.message and "not a safety net" in f.message
    assert f.evidence["clip_active_share"] == 1.0 and f.evidence["clip_limit"] == 1.0
    assert f.evidence["clip_kept"] == pytest.approx(1 / np.median(_total(run)), rel=1e-5)
    assert f.causes[0].startswith("loss scale:") and f.causes[1].startswith("gradient clipping:")
    # already clipped: told to give the lr the step clipping takes, not to clip
    assert not any(r.action.startswith(("Clip the gradient norm", "Or clip adaptively")) for r in f.remedies)
    lr = next(r for r in f.remedies if r.action.startswith("Give the learning rate"))
    assert f"{0.1 * f.evidence['clip_kept']:.3g}" in lr.code


def test_a_plateau_under_clipping_on_every_step_follows_from_it_not_from_the_learning_rate():
    """The loss sat at 1.4e5 while every step was clipped: the plateau said to raise the lr tenfold,
    which clipping would have cut back to the same step."""
    run = _clipped(2e4)
    found = diagnose(run)
    clip, plateau = (next(f for f in found if f.kind == k) for k in ("exploding_gradient", "loss_plateau"))
    assert "follows from the exploding gradient found" in plateau.message
    assert plateau.causes[0].startswith("exploding_gradient: clipping on 100% of the steps: loss scale:")
    assert plateau.remedies[0] == clip.remedies[0]
    assert not any(r.action.startswith("Raise the learning rate") for r in plateau.remedies)
    rare = next(f for f in diagnose(_clipped(2e4, clip_at=None, grad_clip=None)) if f.kind == "loss_plateau")
    assert "follows from" not in rare.message  # no clipping: the plateau's own advice


@pytest.mark.parametrize("case", ["rare", "mild", "adam", "by value"])
def test_clipping_rarely_active_mildly_active_under_adam_or_by_value_adds_nothing(case):
    run = {"rare": lambda g: _clipped(0.5, spikes=0.05, grad_clip=g),  # a spike every 20 steps clipped
           "mild": lambda g: _clipped(3.0, grad_clip=g),  # every step, but the step keeps a third of lr·g
           "adam": lambda g: _clipped(2e4, optimizer="Adam", grad_clip=g),  # Adam divides the factor out
           "by value": lambda g: _clipped(2e4, clip_at=None, grad_clip=g and "each entry to ±1 (gradient_clip_val)")}[case]
    assert _same(diagnose(run(HF_CLIP)), diagnose(run(None)))
    assert not any("clip_active_share" in f.evidence for f in diagnose(run(HF_CLIP)))


def test_a_burst_in_a_run_the_trainer_clips_says_the_norms_are_before_its_clipping():
    run = _clipped(0.5)
    run.metrics["grad_norm"][150:] *= 1e3
    run.metrics["update_ratio"][150:] *= 1e3 / np.maximum(1.0, _total(run)[150:, None])  # lr·g, clipped at 1
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert "growth_over_steps" in f.evidence and "clip_active_share" not in f.evidence
    assert f"taken before the run clips {HF_CLIP}" in f.message
    # the run clips at 1 already, at or below twice the healthy level: clipping there is no remedy
    # (a tester's LSTM, clipped at 1 in its loop, was told to clip at 1.0)
    assert not any(r.action.startswith("Clip the gradient norm") for r in f.remedies)


def test_clip_grad_norm_in_a_plain_sgd_loop_is_measured_from_the_sampled_updates():
    """No meta: every sampled update is lr·c long while ‖g‖ is 2e4: the script clips at c."""
    limit = 0.7
    run = _clipped(2e4, grad_clip=None, clip_at=limit)
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["clip_limit"] == pytest.approx(limit, rel=1e-4) and "measured" in f.message
    run.meta["momentum"] = 0.9  # a momentum step sums past gradients: its length says no limit
    assert not any("clip_limit" in f.evidence for f in diagnose(run))


def _loop(scale: float, clip: float = 1.0, steps: int = 40):
    """A regression at `scale` under SGD with clip_grad_norm_ before each step, watched in-process;
    returns the findings and the losses, and those of the same run unwatched."""
    def run(watched: bool):
        torch.manual_seed(0)
        x = torch.randn(256, 10)
        y = (x @ torch.randn(10, 1)) * scale
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        watch = gw.watch(model, opt, warn=False) if watched else None
        losses = []
        for i in range(steps):
            b = slice(32 * (i % 8), 32 * (i % 8 + 1))
            loss = nn.functional.mse_loss(model(x[b]), y[b])
            opt.zero_grad(), loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            losses.append(loss.item())
        found = watch.findings() if watched else None
        if watched:
            watch.detach()
        return found, losses
    (found, losses), (_, plain) = run(True), run(False)
    assert losses == plain  # watching changed nothing
    return found


def test_a_real_sgd_loop_clipped_on_every_step_is_told_and_one_clipped_rarely_is_not():
    f = next(f for f in _loop(300.0) if f.kind == "exploding_gradient")
    assert "clip_active_share" in f.evidence and f.evidence["clip_limit"] == pytest.approx(1.0, rel=1e-2)
    assert not any("clip_active_share" in f.evidence for f in _loop(1.0))


def test_a_lightning_run_whose_trainer_clips_every_step_is_told(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradwatchCallback

    class Regression(pl.LightningModule):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y * self.scale)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def fit(scale, out):
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
        callback = GradwatchCallback(out=out)
        trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                             callbacks=[callback], default_root_dir=tmp_path)
        trainer.fit(Regression(scale), torch.utils.data.DataLoader(data, batch_size=32))
        return gw.diagnose(out)

    f = next(f for f in fit(300.0, tmp_path / "big") if f.kind == "exploding_gradient")
    assert "gradient_clip_val" in f.message and f.evidence["clip_active_share"] >= 0.9
    assert not any("clip_active_share" in f.evidence for f in fit(1.0, tmp_path / "small"))


def test_a_plateau_under_clipping_on_every_step_at_a_loss_of_order_one_is_told_to_raise_the_limit():
    """Each step is lr x the limit, a 1e-4 share of lr·g: too short. The exploding finding's fix
    keeps the step's length (SGD lr 1e-3 clipped at 0.01: 69.3 as it was and with that fix, 1.93
    with the limit raised to twice the norm), so the plateau's own is to raise the limit."""
    run = _clipped(2e4)
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).random(len(run.loss))  # no loss-scale problem
    found = diagnose(run)
    clip, plateau = (next(f for f in found if f.kind == k) for k in ("exploding_gradient", "loss_plateau"))
    assert not clip.causes[0].startswith("loss scale:")
    assert "too short to move the loss" in plateau.causes[0]
    limit = float(f"{2 * clip.evidence['clip_median_norm']:.2g}")
    assert plateau.remedies[0].action.startswith("Raise the clipping limit") and f"max_norm={limit:g}" in plateau.remedies[0].code
