"""A loss flat near 0 is converged, or stuck on targets of a small scale: the loss alone cannot
tell, so it is said as info, never a warning to raise the learning rate."""

import numpy as np

from gradwatch.diagnose import diagnose
from series_builder import build


def _flat(level: float):
    run = build(n_steps=300)
    run.loss[:] = level * (1 + 0.002 * np.random.default_rng(0).standard_normal(300))
    return [f for f in diagnose(run) if f.kind == "loss_plateau"]


def test_a_flat_loss_near_zero_is_info_naming_both_readings():
    """A regression stuck at lr 1e-6 on targets y/20 went 0.0013 -> 0.0012 and nothing was said."""
    f, = _flat(0.0013)
    assert f.severity == "info" and "converged" in f.message and "standardise" in f.message
    g, = _flat(0.5)  # the same plateau at unit scale: a warning
    assert g.severity == "warning"
