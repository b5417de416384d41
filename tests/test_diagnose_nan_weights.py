"""A NaN in the weights before any update (a bad initialisation, a loaded checkpoint) is said as
such, in that layer: it was said to first appear in the loss, in layers '1' and '3', and blamed on
the learning rate."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import advice, diagnose
from series_builder import build


def _non_finite(run):
    return next(f for f in diagnose(run) if f.kind == "non_finite")


def _no_lr_blame(f) -> bool:
    return not any("learning rate" in c for c in f.causes) and \
        not any("learning rate" in r.action.lower() for r in f.remedies)


def test_a_weight_non_finite_at_the_first_step_is_the_origin():
    run = build(n_steps=30, depth=3)
    fc0, fc1, act0 = run.column("fc0"), run.column("fc1"), run.column("act0")
    run.metrics["weight_norm"][0, fc0] = np.inf  # before any update
    run.metrics["act_mean"][:, act0] = np.inf
    run.metrics["grad_norm"][:, [fc0, fc1]] = np.inf
    run.loss[:] = np.inf
    f = _non_finite(run)
    assert f.layers[0] == "fc0" and f.evidence["first_seen_in"] == "weights"
    assert f.evidence["nonfinite_weights_at_start"] == ["fc0"] and "before any update" in f.message
    assert _no_lr_blame(f)
    assert advice.nan_cause(f.evidence) == "weights"  # not "data": no operation in a step made it


def test_a_weight_non_finite_from_the_start_under_gw_guard_is_still_an_error():
    """Every step's gradient is then NaN and gw.guard skips them all: 'the weights never took them'
    (a warning) would hide weights that hold NaN for good."""
    run = build(n_steps=30, depth=3)
    fc0 = run.column("fc0")
    run.metrics["weight_norm"][:, fc0] = np.inf
    run.metrics["grad_norm"][:, fc0] = np.inf
    run.loss[:] = np.inf
    run.meta["guard_skipped_steps"] = [int(s) for s in run.steps]
    f = _non_finite(run)
    assert f.severity == "error" and "before any update" in f.message and "guard_skipped_steps" not in f.evidence


def test_a_weight_that_turned_non_finite_later_is_not_called_initial():
    run = build(n_steps=30, depth=3)
    fc0 = run.column("fc0")
    run.metrics["weight_norm"][10, fc0] = np.inf
    run.loss[10:] = np.inf
    f = _non_finite(run)
    assert "nonfinite_weights_at_start" not in f.evidence and f.first_step == 10
    assert advice.nan_cause(f.evidence) != "weights"


def test_a_real_run_from_a_nan_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    model[0].weight.data[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    f = _non_finite(w.series())
    assert f.first_step == 0 and f.layers[0] == "0" and f.evidence["nonfinite_weights_at_start"] == ["0"]
    assert _no_lr_blame(f)


def test_a_weight_norm_overflowing_float32_under_a_finite_loss_is_no_nan():
    """A tester's DDP run at a bad lr: weights at 5.6e28, loss still finite at 3.1e24, and the norm's
    float32 sum of squares overflowed: "NaN/Inf first appears at step 10 in the weights"."""
    assert float(torch.linalg.vector_norm(torch.full((1000,), 5.6e28))) == float("inf")  # torch's norm does
    run = build(n_steps=30, depth=3)
    fc1 = run.column("fc1")
    run.metrics["weight_norm"][10:, fc1] = np.inf  # from 10 at step 0 (sampled every 10 steps)
    run.loss[10:] = 3.1e24
    assert not [f for f in diagnose(run) if f.kind == "non_finite"]
    run.loss[10:] = 7.0  # no blow-up about it: the norm holds a NaN or Inf
    assert _non_finite(run).first_step == 10
    run.metrics["weight_norm"][10, run.column("fc0")] = 5.6e14  # ... unless another layer's norm is blowing up
    run.loss[11:] = 3.1e24
    assert not [f for f in diagnose(run) if f.kind == "non_finite"]
    run.loss[20:] = np.inf  # then the loss too: non-finite from there
    f = _non_finite(run)
    assert f.first_step == 20


def test_a_checkpoint_nan_the_batches_reach_later_stays_a_nan_of_the_weights():
    """A reviewer's embedding loaded with a NaN row, reached by a batch at step 15: its norm is
    infinite from the first record under finite losses, and was masked as an overflow."""
    run = build(n_steps=30, depth=3)
    fc0 = run.column("fc0")
    run.metrics["weight_norm"][:, fc0] = np.inf
    run.loss[15:] = np.inf
    f = _non_finite(run)
    assert f.first_step == 0 and f.evidence["nonfinite_weights_at_start"] == ["fc0"]


def test_a_grad_scaler_skipping_every_iteration_to_the_end_is_non_finite():
    """A tester's float16 attention model: 31 steps stored of 150, the GradScaler skipped the rest
    (81 in a row to the end, its scale down to 1e-31), and there was no finding: skipped steps are
    events, never steps. Its start-up backoff's few skips are not this."""
    run = build(n_steps=31, depth=3)
    run.meta["skipped_steps"] = [0] * 9 + [7, 17, 17] + [30] * 21 + [31] * 81
    f = _non_finite(run)
    assert f.first_step == 31 and f.evidence["scaler_skipped_to_end"] == 81 and "nothing trained after step 30" in f.message
    assert "bfloat16" in f.remedies[1].code and f.remedies[0].action.startswith("Find the operation")
    run.meta["skipped_steps"] = [0] * 9 + [30] * 8 + [31] * 5  # the start-up backoff, a few mid-run and at the end
    assert not [f for f in diagnose(run) if f.kind == "non_finite"]
    # reviewers: every iteration skipped from the first (no step stored); most of them, batch by
    # batch; and a later phase's skips, which are not an earlier phase's
    empty = dataclasses.replace(run, steps=run.steps[:0], loss=run.loss[:0], lr=run.lr[:0],
                                metrics={m: v[:0] for m, v in run.metrics.items()}, meta={**run.meta, "skipped_steps": [0] * 60})
    assert [f.kind for f in diagnose(empty)] == ["non_finite"]
    run.meta["skipped_steps"] = [s for s in range(31) for _ in range(2)]  # two skipped per stored step
    f = _non_finite(run)
    assert f.evidence["scaler_skipped"] == 62 and "skipped 62 of 93 iterations" in f.message
    run.meta["skipped_steps"] = [31 + s for s in range(40)]  # a later phase's, one at a time
    assert not [f for f in diagnose(dataclasses.replace(run, meta={**run.meta, "phase_starts": []}).between(0, 31))
                if f.kind == "non_finite"]
