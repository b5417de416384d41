"""ReLU units that die during training while the loss still falls by half or more are capacity
lost, not a block: `info`, not a warning (a RealNVP whose coupling nets each see one coordinate
lost half of a ReLU layer and learnt as well as with Leaky ReLU). Units dead from the first step,
or dying while the loss stays put, are still a warning."""

import numpy as np

import gradwatch as gw
from series_builder import build, sampled


def _dead_from(step: int, flat_loss: bool = False, fraction: float = 0.6, optimizer: str = "Adam", lr: float = 1e-3,
               still_falling: bool = False, update_ratio: float | None = None):
    run = build(n_steps=300, depth=4, optimizer=optimizer, lr=lr)
    if update_ratio is not None:  # every sampled update of every weight layer
        u = run.metrics["update_ratio"]
        u[np.isfinite(u)] = update_ratio
    if still_falling:  # halving every 100 steps to the end
        run.loss[:] = 2.0 * np.exp(-np.arange(300) / 150) * (1 + 0.02 * np.random.default_rng(0).random(300))
    rows = sampled(run)
    c = run.column("act1")
    run.metrics["dead"][rows[run.steps[rows] >= step], c] = fraction
    if flat_loss:
        run.loss[:] = 2.0 + 0.02 * np.random.default_rng(0).random(len(run.loss))
    return [f for f in gw.diagnose(run) if f.kind == "dead_units"]


def test_units_dying_while_the_loss_still_halves_are_info():
    (f,) = _dead_from(40)
    start, end = f.evidence["loss_since_onset"]
    assert f.severity == "info" and end <= 0.5 * start
    assert f.layers == ("act1",)


def test_units_dying_while_the_loss_stays_put_are_a_warning():
    (f,) = _dead_from(40, flat_loss=True)
    assert f.severity != "info" and "loss_since_onset" not in f.evidence  # an error beside the plateau it explains


def test_units_dead_from_the_first_step_or_nearly_all_stay_said():
    assert [f.severity for f in _dead_from(0)] == ["warning"]
    assert [f.severity for f in _dead_from(40, fraction=0.95)] == ["error"]


def test_units_a_high_lr_killed_while_the_loss_halved_and_stalled_are_a_warning():
    # the step size killed them (Adam at 0.05; SGD whose updates were 30% of the weights): the loss it
    # left can stall far higher
    for optimizer, lr, u in (("Adam", 0.05, None), ("SGD", 0.1, 0.3)):
        (f,) = _dead_from(40, optimizer=optimizer, lr=lr, update_ratio=u)
        assert f.severity == "warning" and "loss_since_onset" not in f.evidence
        assert f.causes[0].startswith("learning rate")


def test_units_dying_in_a_converged_sgd_run_at_healthy_steps_are_info():
    """advice names SGD's lr always; at updates a healthy SGD run makes (1e-3; 0.03, the peak of a
    converged momentum CNN on digits) it did not kill them, and a converged run's flat end is no stall
    (60% dead, loss 1.15 -> 0.11: was told a block)."""
    for lr, u in ((0.01, 1e-3), (0.001, 1e-3), (0.05, 0.03)):
        (f,) = _dead_from(40, optimizer="SGD", lr=lr, update_ratio=u)
        assert f.severity == "info"


def test_units_a_high_lr_killed_while_the_loss_still_falls_at_the_end_are_info():
    (f,) = _dead_from(40, optimizer="SGD", lr=0.1, still_falling=True, update_ratio=0.3)
    assert f.severity == "info" and f.causes[0].startswith("learning rate")


def test_units_dying_that_cut_the_layers_below_off_any_gradient_are_a_block_however_the_loss_fell():
    """A tester's GCN on a raw adjacency: its loss 'fell' from 1.75e4 to chance while the layers
    below the dead units got exactly zero gradient; it was said as info, capacity lost."""
    run = build(n_steps=300, depth=4)
    rows = sampled(run)
    run.metrics["dead"][rows[run.steps[rows] >= 40], run.column("act1")] = 0.6
    run.metrics["grad_norm"][40:, run.column("fc0")] = 0.0
    run.metrics["grad_max"][40:, run.column("fc0")] = 0.0
    (f,) = [f for f in gw.diagnose(run) if f.kind == "dead_units"]
    assert f.severity != "info" and f.evidence["zero_gradient_layers"] == ["fc0"]


def test_a_fall_from_a_blow_up_that_ends_above_the_first_loss_is_no_learning():
    """A tester's AdamW at lr 50: 0.79, then 162 and 511 in two steps, 33 at the end; its units
    read as "no block to learning yet" because the loss fell from the blow-up. A run that ends above
    twice its first step's loss has not learnt."""
    run = build(n_steps=300, depth=4, optimizer="Adam", lr=1e-3)
    run.loss[:] = 33.0 + 500.0 * np.exp(-np.arange(300) / 20.0)
    run.loss[0] = 0.79
    rows = sampled(run)
    run.metrics["dead"][rows[run.steps[rows] >= 40], run.column("act1")] = 0.6
    (f,) = [f for f in gw.diagnose(run) if f.kind == "dead_units"]
    assert f.severity != "info" and "loss_since_onset" not in f.evidence
    run.loss[0] = 600.0  # (the same fall from a first loss above it: learning)
    (f,) = [f for f in gw.diagnose(run) if f.kind == "dead_units"]
    assert f.severity == "info"
