"""A schedule that takes the learning rate to ~0 long before the run ends stops learning: a plateau
from there, though the loss fell at first (so the whole run's first and last tenths differ)."""

import numpy as np

from gradwatch.diagnose import diagnose
from series_builder import build


def _run(lr: np.ndarray, loss_end: float):
    """400 steps whose loss falls from 2.3 to `loss_end` over the first 60 and stays there (noisy)."""
    run = build(n_steps=400)
    steps = np.arange(400)
    noise = 0.01 * np.random.default_rng(0).standard_normal(400)
    run.loss[:] = loss_end + (2.3 - loss_end) * np.clip(1 - steps / 60, 0, 1) + noise
    run.lr[:] = lr
    return run


def _plateaus(run):
    return [f for f in diagnose(run) if f.kind == "loss_plateau"]


def test_a_step_schedule_stepped_per_batch_is_a_plateau_from_where_the_lr_died():
    """StepLR(step_size=10, gamma=0.5) meant per epoch, stepped per batch: lr 0.05 -> 5e-5 by step 100
    of 400; the loss went 2.30 -> 2.12 and stayed (43% accuracy), and nothing was said."""
    per_batch = 0.05 * 0.5 ** (np.arange(400) // 10)
    f, = _plateaus(_run(per_batch, 2.12))
    assert f.first_step == 100 and f.evidence["lr_since"] <= 1e-3 * 0.05
    assert f.causes[0].startswith("learning rate: the schedule took it from 0.05") and "once per epoch" in f.remedies[0].action


def test_a_schedule_that_ends_learning_after_the_loss_fell_far_or_only_at_the_end_is_none():
    per_batch = 0.05 * 0.5 ** (np.arange(400) // 10)
    assert not _plateaus(_run(per_batch, 0.3))  # learnt, then annealed: converged
    cosine = 0.05 * 0.5 * (1 + np.cos(np.pi * np.arange(400) / 399))  # below 1e-3 of its peak for its last 2%
    assert not _plateaus(_run(cosine, 2.12))
    assert not _plateaus(_run(np.full(400, 0.05), 2.12))  # a constant lr: the loss fell, and the plateau rule's own


def test_reduce_on_plateau_cutting_the_lr_after_the_loss_stopped_is_none():
    """ReduceLROnPlateau as documented: the loss fell at lr 0.1 and stopped (a label-noise floor),
    and only then was the lr cut tenfold every 30 steps, to 1e-4 of its peak; it was told to step its
    scheduler once per epoch. The same cuts begun while the loss still fell are the schedule's doing."""
    steps = np.arange(400)
    after = 0.1 * 0.1 ** np.clip((steps - 160) // 30 + 1, 0, 4)  # flat from step 60, first cut at 160
    assert not _plateaus(_run(after, 1.8))
    after[:20] *= np.arange(1, 21) / 20  # a linear warm-up first: the fall is still from the peak
    assert not _plateaus(_run(after, 1.8))
    during = 0.1 * 0.1 ** np.clip((steps - 10) // 30 + 1, 0, 4)  # first cut at step 10
    assert [f.first_step for f in _plateaus(_run(during, 1.8))] == [100]
