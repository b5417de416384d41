"""A plateau whose gradient is exactly 0 in every layer: the learning rate is no cause (a tenfold
lr multiplies 0). A tester's classifier whose sigmoid rounded to exactly 0 or 1 before BCELoss was
told to raise its lr, and stayed at 49.86; on the logits (BCEWithLogitsLoss) it reached 0.011."""

import numpy as np

import gradwatch as gw
from gradwatch.store.series import LayerInfo, RunSeries
from series_builder import build


def _flat(zero: bool, pinned: bool) -> RunSeries:
    run = build(n_steps=300, depth=3)
    n = len(run.steps)
    layers = [*run.layers, LayerInfo("out", "Sigmoid", 99, "activation", 0, "sigmoid")]
    metrics = {m: np.concatenate([v, np.full((n, 1), np.nan)], axis=1) for m, v in run.metrics.items()}
    metrics["saturated"][::10, -1] = 1.0 if pinned else 0.01
    if zero:
        metrics["grad_norm"][1:, run.weight_columns()] = 0.0
    loss = 50 + 0.01 * np.random.default_rng(0).random(n)
    return RunSeries(layers, run.steps, loss, run.lr, metrics, meta=run.meta)


def _plateau(run: RunSeries) -> gw.Finding:
    (f,) = [f for f in gw.diagnose(run) if f.kind == "loss_plateau"]
    return f


def test_a_plateau_with_no_gradient_under_a_pinned_sigmoid_is_told_to_take_the_loss_on_the_logits():
    f = _plateau(_flat(zero=True, pinned=True))
    assert f.causes[0].startswith("the output's Sigmoid is pinned") and "BCEWithLogitsLoss" in f.remedies[0].code
    assert f.evidence["zero_gradient_share"] > 0.99 and not any("learning rate" in c for c in f.causes)


def test_one_with_no_gradient_and_no_pinned_output_is_told_to_find_where_it_stops():
    f = _plateau(_flat(zero=True, pinned=False))
    assert f.causes[0].startswith("the gradient is exactly 0 in every layer") and "register_hook" in f.remedies[0].code


def test_one_with_a_gradient_is_still_the_learning_rates():
    f = _plateau(_flat(zero=False, pinned=True))
    assert "zero_gradient_share" not in f.evidence and f.causes[0].startswith("learning rate")
