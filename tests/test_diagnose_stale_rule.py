"""The stale_gradients rule on hand-built series: the watch's meta makes the finding, and an
exploding gradient beside it names it as the first cause, with its fix first."""

from dataclasses import replace

import numpy as np

from gradwatch.diagnose import diagnose
from series_builder import build, kinds

SAID = {"optimizer": "SGD", "first_step": 1, "layer": "fc4", "carried_over": 10, "checks": 10}


def _with(run, said):
    return replace(run, meta={**run.meta, "stale_gradients": said})


def test_no_meta_no_finding():
    assert "stale_gradients" not in kinds(diagnose(build()))


def test_the_meta_is_an_error_naming_the_optimizer_step_and_fix():
    f = next(f for f in diagnose(_with(build(), SAID)) if f.kind == "stale_gradients")
    assert (f.severity, f.first_step, f.layers) == ("error", 1, ())
    assert "SGD" in f.message and "step 1" in f.message and "optimizer.zero_grad()" in f.message
    assert "each of the 10 steps checked" in f.message
    assert f.causes[0].startswith("stale gradients:") and "sum" in f.causes[0]
    assert "optimizer.zero_grad()" in f.remedies[0].code
    assert f.evidence["layer_checked"] == "fc4" and f.evidence["carried_over"] == 10


def test_carry_over_at_some_steps_only_says_how_many():
    f = next(f for f in diagnose(_with(build(), {**SAID, "carried_over": 3})) if f.kind == "stale_gradients")
    assert "at 3 of the 10 steps checked from step 1 on" in f.message


def test_an_exploding_gradient_names_stale_gradients_first():
    run = build()
    run.metrics["grad_norm"] *= (1.5 ** np.clip(np.arange(100) - 39, 0, None))[:, None]
    plain = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert not plain.causes[0].startswith("stale gradients")
    f = next(f for f in diagnose(_with(run, SAID)) if f.kind == "exploding_gradient")
    assert f.causes[0].startswith("stale gradients:") and f.causes[1:] == plain.causes
    assert "optimizer.zero_grad()" in f.remedies[0].code and f.remedies[1:] == plain.remedies
    assert "zero_grad" in f.message


def test_a_phase_without_the_carry_over_is_not_told():
    """A run of two models one after the other: the meta's first step is in the second phase."""
    run = replace(build(), meta={**build().meta, "phase_starts": [50]})
    found = diagnose(_with(run, {**SAID, "first_step": 60}))
    assert [f.first_step for f in found if f.kind == "stale_gradients"] == [60]


def _plateau(run):
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    return run


def test_a_plateau_beside_stale_gradients_follows_from_them_not_from_the_learning_rate():
    """A loop that zeroes the gradients once an epoch plateaued and was told to raise the lr
    tenfold; the plateau is the summed gradients', and its advice is the zero_grad()."""
    alone = next(f for f in diagnose(_plateau(build())) if f.kind == "loss_plateau")
    assert alone.remedies[0].action.startswith("Raise the learning rate")
    found = diagnose(_with(_plateau(build()), SAID))
    stale, plateau = (next(f for f in found if f.kind == k) for k in ("stale_gradients", "loss_plateau"))
    assert "follows from the stale gradients found" in plateau.message
    assert plateau.remedies[0] == stale.remedies[0] and plateau.causes[0].startswith("stale_gradients: each update")
    assert not any(r.action.startswith("Raise the learning rate") for r in plateau.remedies)


def test_a_divergence_beside_stale_gradients_follows_from_them():
    """The summed gradients push on after the loss turns: a rising loss was told to lower the lr."""
    run = build()
    run.loss[60:] = run.loss[59] * 1.2 ** np.arange(1, 41)
    alone = next(f for f in diagnose(run) if f.kind == "loss_divergence")
    f = next(f for f in diagnose(_with(run, SAID)) if f.kind == "loss_divergence")
    assert "rises" in f.message and "follows from the stale gradients found" in f.message
    assert f.evidence == alone.evidence and "optimizer.zero_grad()" in f.remedies[0].code
    assert not any(r.action.startswith("Lower the learning rate") for r in f.remedies)


def test_units_that_died_after_stale_gradients_began_name_them_first():
    """A ReLU net under a forgotten zero_grad() lost 92% of a layer's units and was told only of
    the learning rate; dead units from the start (before the carry-over) are not its doing."""
    run = build()
    col = run.column("act1")
    rows = ~np.isnan(run.metrics["dead"][:, col])
    run.metrics["dead"][rows & (run.steps >= 40), col] = 0.95
    alone = next(f for f in diagnose(run) if f.kind == "dead_units")
    f = next(f for f in diagnose(_with(run, SAID)) if f.kind == "dead_units")
    assert f.causes[0].startswith("stale_gradients:") and f.causes[1:] == alone.causes
    assert "optimizer.zero_grad()" in f.remedies[0].code and f.remedies[1:] == alone.remedies
    assert f.message.startswith(alone.message) and "follows the stale gradients found" in f.message
    early = next(f for f in diagnose(_with(run, {**SAID, "first_step": 60})) if f.kind == "dead_units")
    assert early.causes == alone.causes


def test_findings_are_paired_with_causes_in_their_own_phase_only():
    """Two models one after the other: the second's stale gradients explained the first's plateau
    (told to clear the gradients, which its loop did) and the first's dead units."""
    run = _plateau(build(n_steps=200))
    run.meta["phase_starts"] = [100]
    found = diagnose(_with(run, {**SAID, "first_step": 110}))
    first = [f for f in found if f.kind == "loss_plateau" and f.first_step < 100]
    assert first and all("stale" not in f.message for f in first)
    assert first[0].remedies[0].action.startswith("Raise the learning rate")
    second = [f for f in found if f.kind == "loss_plateau" and f.first_step >= 100]
    assert all("follows from the stale gradients found" in f.message for f in second)
