"""Bursts on a schedule: a DQN's target network copied every N steps re-sets the targets the
Q-network fits, so the loss leaps and the gradient norm with it, at a fixed period, and both
settle back before the next copy. That is the script's schedule, not an exploding gradient or a
diverging loss; the same bursts at irregular times, or growing, or a loss that does not come
back, still are."""

import numpy as np

import gradwatch as gw
from gradwatch.diagnose.signals import periodic
from series_builder import build, kinds


def _sawtooth(resets, n=1000, peak=0.05, grow=1.0, floor=1e-6):
    """A DQN-like run: the loss and gradient norm leap at each reset and decay as the net fits the
    new targets (peak x grow**k at the k-th reset)."""
    run = build(n_steps=n, depth=3, optimizer="Adam", lr=1e-3)
    rng = np.random.default_rng(1)
    t = np.arange(n)
    g = 0.01 * np.exp(-t / 30) + 3e-4
    loss = 7e-4 * np.exp(-t / 20) + floor
    for k, r in enumerate(resets):
        after = t >= r
        g = np.where(after, peak * grow ** k * np.exp(-(t - r) / 10) + 3e-4, g)
        loss = np.where(after, 0.01 * grow ** (2 * k) * np.exp(-(t - r) / 20) + floor, loss)
    g = g * np.exp(0.2 * rng.standard_normal(n))
    loss = loss * np.exp(0.2 * rng.standard_normal(n))
    for c in (run.column(f"fc{i}") for i in range(3)):
        run.metrics["grad_norm"][:, c] = g / np.sqrt(3)
    run.loss[:] = loss
    return run


PERIODIC = list(range(140, 1000, 100))


def test_gradient_bursts_at_a_fixed_period_are_no_explosion():
    assert "exploding_gradient" not in kinds(gw.diagnose(_sawtooth(PERIODIC)))


def test_loss_leaps_at_a_fixed_period_that_come_back_are_no_divergence():
    assert "loss_divergence" not in kinds(gw.diagnose(_sawtooth(PERIODIC)))


def test_the_same_bursts_at_irregular_times_still_explode():
    resets = np.cumsum(np.random.default_rng(3).integers(45, 160, size=12)) + 100
    findings = gw.diagnose(_sawtooth([int(r) for r in resets if r < 950]))
    assert "exploding_gradient" in kinds(findings)


def test_periodic_bursts_that_grow_still_explode():
    findings = gw.diagnose(_sawtooth(PERIODIC, grow=2.0))
    assert "exploding_gradient" in kinds(findings)


def test_a_periodic_sawtooth_whose_troughs_rise_still_diverges():
    run = _sawtooth(PERIODIC)
    run.loss[:] = run.loss + np.where(np.arange(1000) > 300, 0.01, 0.0)  # never back near the start
    assert "loss_divergence" in kinds(gw.diagnose(run))


def test_periodic_allows_missed_events_but_not_random_times():
    th = gw.Thresholds()
    assert periodic(np.array([38, 238, 338, 438, 538, 638, 838, 938]), th)  # two syncs left no leap
    assert not periodic(np.array([38, 238, 338, 438]), th)  # too few to tell
    assert not periodic(np.array([100, 190, 320, 400, 530, 610]), th)


def test_periodic_bursts_growing_under_a_decade_still_explode_and_diverge():
    # 1.3x per reset: the last norm peak 8x the first (under the decade the old guard allowed), the loss's 66x
    findings = gw.diagnose(_sawtooth(PERIODIC, grow=1.3))
    assert {"exploding_gradient", "loss_divergence"} <= set(kinds(findings))


def test_bursts_at_warm_restarts_of_the_lr_are_the_lrs_doing():
    run = _sawtooth(PERIODIC)
    since = np.arange(1000) - np.maximum.accumulate(np.where(np.isin(np.arange(1000), PERIODIC), np.arange(1000), 0))
    run.lr[:] = 0.05 * 0.5 * (1 + np.cos(np.pi * np.minimum(since, 100) / 100))  # cosine, restarted at each burst
    assert "exploding_gradient" in kinds(gw.diagnose(run))


def test_sync_bursts_whose_settled_level_grows_with_the_q_values_are_no_explosion():
    """A DQN whose Q scale grows 10x over the run: the norm between syncs grows with it, each sync's
    burst ~300x that level; compared absolute, its peaks read as growing and explosive."""
    n = 1200
    t = np.arange(n)
    run = build(n_steps=n, depth=3, optimizer="Adam", lr=1e-3)
    scale = 1 + 9 * t / n
    since = t % 100
    g = 0.5 * scale * (1 + 0.1 * np.random.default_rng(0).random(n)) + np.where(t >= 100, 300 * scale * np.exp(-since / 3.0), 0)
    for i in range(3):
        run.metrics["grad_norm"][:, run.column(f"fc{i}")] = g / np.sqrt(3)
    run.loss[:] = (2 * np.exp(-t / 300) + 0.2) * scale * (1 + np.where(t >= 100, 5 * np.exp(-since / 3.0), 0))
    assert "exploding_gradient" not in kinds(gw.diagnose(run))


def test_sync_bursts_of_one_size_over_a_settling_level_are_no_explosion():
    """The bursts the same size while the level between them falls 10x as the net fits: over that
    level alone the peaks read as growing (an error); grown they must be in both measures."""
    run = _sawtooth(PERIODIC)
    t = np.arange(1000)
    g = run.metrics["grad_norm"][:, run.column("fc0")] * np.sqrt(3)
    g = g + 3e-4 * (10 ** (1 - t / 1000) - 1)  # the settled level 3e-3 -> 3e-4
    for c in (run.column(f"fc{i}") for i in range(3)):
        run.metrics["grad_norm"][:, c] = g / np.sqrt(3)
    assert "exploding_gradient" not in kinds(gw.diagnose(run))
