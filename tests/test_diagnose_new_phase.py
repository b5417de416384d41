"""A backbone frozen mid-run (requires_grad_(False)) for a fine-tune on new data: the total norm
then sums other layers over another loss, and its leap at that step is the new phase's level, not
an explosion. The same leap with every layer still trained, or one later in the phase, still is."""

import numpy as np

import gradwatch as gw
from series_builder import build, kinds


def _fine_tune(freeze: bool, leap_at: int = 150):
    run = build(n_steps=400, depth=3, optimizer="Adam", lr=1e-3)
    t = np.arange(400)
    g = np.where(t < leap_at, 0.3, 0.3 + 12 * np.exp(-(t - leap_at) / 60))
    g = g * np.exp(0.1 * np.random.default_rng(0).standard_normal(400))
    for i in range(3):
        run.metrics["grad_norm"][:, run.column(f"fc{i}")] = g / np.sqrt(3)
    if freeze:
        for i in range(2):
            run.metrics["grad_norm"][150:, run.column(f"fc{i}")] = np.nan
    return run


def test_a_leap_where_the_trained_layers_change_is_no_explosion():
    assert "exploding_gradient" not in kinds(gw.diagnose(_fine_tune(freeze=True)))


def test_a_live_check_right_after_the_switch_sees_no_explosion_either():
    run = _fine_tune(freeze=True).between(0, 160)  # what a check 10 steps after the switch reads
    assert "exploding_gradient" not in kinds(gw.diagnose(run))


def test_the_same_leap_without_a_change_or_later_in_the_phase_still_explodes():
    assert "exploding_gradient" in kinds(gw.diagnose(_fine_tune(freeze=False)))
    assert "exploding_gradient" in kinds(gw.diagnose(_fine_tune(freeze=True, leap_at=250)))


def test_a_leap_where_the_trained_layers_change_that_ends_non_finite_still_explodes():
    run = _fine_tune(freeze=True)
    run.metrics["grad_norm"][200:, run.column("fc2")] = np.inf
    run.loss[200:] = np.inf
    assert "exploding_gradient" in kinds(gw.diagnose(run))


def test_gradual_unfreezing_that_blows_up_the_layers_already_trained_still_explodes():
    # fc2 alone, fc1 joins at 150, fc0 at 300: at each, every trained layer leaps 1000x and stays 100x up
    run = build(n_steps=450, depth=3, optimizer="Adam", lr=1e-3)
    t = np.arange(450)
    level = np.ones(450)
    for s in (150, 300):
        level[s:] *= 100
        level[s:s + 5] *= 10
    noise = np.exp(0.1 * np.random.default_rng(0).standard_normal(450))
    for i, on in ((0, 300), (1, 150), (2, 0)):
        run.metrics["grad_norm"][:, run.column(f"fc{i}")] = np.where(t >= on, level * noise, np.nan)
    assert "exploding_gradient" in kinds(gw.diagnose(run))
