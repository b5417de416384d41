"""The second final beside a leader that repaired the run: another way of making the same change,
screened behind the leader beyond the noise of the two losses, is not run at full length."""

from gradwatch.fix import Trial, pick_finals
from gradwatch.fix.candidates import adam, lr_scale, norm, swap
from gradwatch.fix.trial import lower_beyond_noise

SELU, LEAKY = swap("*", "SELU", "lecun"), swap("Sigmoid", "LeakyReLU", "auto")


def screened(*rows: tuple) -> list[Trial]:
    """Screening trials that repaired the run, best first, from (candidate, loss, its standard error)."""
    return [Trial(c, None, 0, 0.1, steps=50, final_loss=loss, final_error=error, spread_error=error)
            for c, loss, error in rows]


def names(cands) -> list[str]:
    return [c.name for c in cands]


def test_an_alternative_far_behind_the_leader_is_not_a_final():
    # a sigmoid MLP's screening: SELU 0.329 +- 0.025, LeakyReLU 0.649 +- 0.048 (6 errors apart)
    trials = screened((SELU, 0.329, 0.025), (LEAKY, 0.649, 0.048))
    assert lower_beyond_noise(*trials)  # the premise: the two swaps differ beyond the noise
    assert names(pick_finals(trials)) == [SELU.name]


def test_an_alternative_within_the_noise_is_still_a_final():
    # a CNN's screening: SELU 0.00137 +- 0.00017, LeakyReLU 0.00153 +- 0.0053: LeakyReLU won in full
    trials = screened((SELU, 0.00137, 0.00017), (LEAKY, 0.00153, 0.0053))
    assert not lower_beyond_noise(*trials)
    assert names(pick_finals(trials)) == [SELU.name, LEAKY.name]


def test_a_remedy_that_combines_with_the_leader_is_paired_however_far_behind():
    # BatchNorm 0.895 +- 0.038 and LeakyReLU 1.534 +- 0.062 screened; together 0.075 in full
    batch = norm("batch")
    trials = screened((batch, 0.895, 0.038), (LEAKY, 1.534, 0.062))
    assert names(pick_finals(trials)) == [batch.name, f"{batch.name} + {LEAKY.name}"]


def test_the_next_close_repair_takes_the_place_of_one_far_behind():
    # lr x0.1 and Adam both set the step: Adam far behind is left out, the combinable swap pairs
    lower = lr_scale(0.1)
    trials = screened((lower, 0.336, 0.035), (adam(), 0.601, 0.059), (LEAKY, 0.62, 0.2))
    assert names(pick_finals(trials)) == [lower.name, f"{lower.name} + {LEAKY.name}"]


def test_without_measured_errors_the_alternative_is_still_a_final():
    trials = screened((SELU, 0.329, float("nan")), (LEAKY, 0.649, 0.048))
    assert names(pick_finals(trials)) == [SELU.name, LEAKY.name]
