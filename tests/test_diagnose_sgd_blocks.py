"""Under plain SGD the update lr·g is predicted at every step from the last sampled weight norm.
The rule reads the steps a block at a time (its whole steps x layers tables took 0.8 GB at 50k
steps x 480 layers): the same step, layers and ratio as lr·‖g‖/‖w‖ computed by hand, across
block edges, in memory that does not grow with the run."""

import tracemalloc

import numpy as np

from gradwatch.diagnose.rules.exploding import _sgd_step_too_large
from gradwatch.diagnose.signals import TOTAL_BLOCK
from gradwatch.diagnose.thresholds import Thresholds
from gradwatch.store.rows import RecordedRows
from gradwatch.store.series import LayerInfo, RunSeries


def _sgd_run(n: int, width: int, spike_at: int | None = None, layer: int = 3) -> RunSeries:
    rng = np.random.default_rng(0)
    steps = np.arange(n)
    sampled = np.flatnonzero(steps % 10 == 7)  # the first rows unsampled: nothing to predict from
    g = 1 + 0.1 * rng.random((n, width))
    w = 10 * (1 + 0.1 * rng.random((len(sampled), width)))
    if spike_at is not None:
        g[spike_at, layer] = 2e3
    lr = np.full(n, 0.01)
    u = lr[sampled, None] * g[sampled] / w  # measured updates that are lr·g: the prediction holds
    metrics = {"grad_norm": RecordedRows(n, steps, g), "weight_norm": RecordedRows(n, sampled, w),
               "update_ratio": RecordedRows(n, sampled, u)}
    layers = [LayerInfo(f"fc{i}", "Linear", i, "param", 100) for i in range(width)]
    return RunSeries(layers, steps, np.ones(n), lr, metrics,
                     meta={"optimizer": "SGD", "sample_every": 10, "skipped_steps": []}), g, w, sampled


def test_the_predicted_step_matches_lr_g_over_the_last_sampled_weight_across_blocks():
    n = 2 * TOTAL_BLOCK + 500
    spike = TOTAL_BLOCK + 3  # just past a block edge, 6 rows after a sample: its weight carried over
    run, g, w, sampled = _sgd_run(n, 6, spike_at=spike)
    step, layers, evidence = _sgd_step_too_large(run, Thresholds())
    last = sampled[sampled <= spike][-1]
    expected = 0.01 * g[spike, 3] / w[np.searchsorted(sampled, last), 3]  # float64, by hand
    assert (step, layers) == (spike, ("fc3",))
    assert np.isclose(evidence["predicted_update_ratio"], expected, rtol=1e-12)


def _peak(n: int, width: int) -> int:
    run, *_ = _sgd_run(n, width)
    tracemalloc.start()
    try:
        assert _sgd_step_too_large(run, Thresholds()) is None
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_overshoot_is_none_and_the_memory_does_not_grow_with_the_steps():
    short, long = _peak(2 * TOTAL_BLOCK, 100), _peak(6 * TOTAL_BLOCK, 100)
    assert long < 1.3 * short  # whole tables: ~3x
