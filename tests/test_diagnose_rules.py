"""Each rule on hand-built series: at, just past and just short of its thresholds."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import DEFAULT, Finding, diagnose
from series_builder import build, kinds, sampled

TH = DEFAULT


def test_healthy_series_has_no_finding():
    assert diagnose(build()) == []


def test_healthy_adam_and_tanh_series_have_no_finding():
    assert diagnose(build(optimizer="Adam", lr=1e-3, activation="tanh")) == []


# ------------------------------------------------------------------ vanishing across depth
def _vanish(run, factor, rows=None, relative=True, backward=True):
    """A geometric collapse toward the input: fc0 gets factor**4 of fc4's relative gradient, and of
    the top hidden layer's ∂L/∂s."""
    cols = [run.column(f"fc{i}") for i in range(5)]
    rows = slice(None) if rows is None else rows
    for k, c in enumerate(cols):
        if relative:
            run.metrics["grad_norm"][rows, c] *= factor ** (4 - k)
        if k < 4 and backward:
            run.metrics["grad_out_rms"][rows, c] *= factor ** (4 * (3 - k) / 3)
    return run


def _blocks(queries):
    """A stack of three blocks (`blocks.K.query`, `blocks.K.ffn`) under a pooler over one token: the
    queries get `queries` of ∂L/∂s (lowest block first), the ffns 1e-5, the pooler 1e-3."""
    from dataclasses import replace
    run = build(depth=7, optimizer="Adam", lr=1e-3)
    rows = sampled(run)
    names = ["blocks.0.query", "blocks.0.ffn", "blocks.1.query", "blocks.1.ffn", "blocks.2.query", "pooler", "classifier"]
    for k, name in enumerate(names):
        c = run.column(f"fc{k}")
        run.layers[c] = replace(run.layers[c], name=name)
        run.metrics["grad_out_rms"][rows, c] = {"query": np.nan, "ffn": 1e-5}.get(name.split(".")[-1], 1e-3)
    for k, q in enumerate(queries):
        run.metrics["grad_out_rms"][rows, run.column(f"blocks.{k}.query")] = q
    return run


@pytest.mark.parametrize("queries, found", [((1e-8, 1.2e-8, 0.9e-8), False), ((1e-8, 1e-6, 1e-4), True)])
def test_repeated_blocks_are_judged_like_with_like(queries, found):
    """In a transformer at init the query/key projections get ~1e-8 of ∂L/∂s in every block alike,
    and a pooler over one token gets a larger RMS: no vanishing (a tester's healthy tiny BERT got
    an ERROR). A collapse from the top block's query to the lowest one's is."""
    f = [f for f in diagnose(_blocks(queries)) if f.kind == "vanishing_gradient"]
    assert bool(f) == found
    if found:
        assert f[0].layers[0] == "blocks.0.query" and f[0].evidence["backward_ratio"] == pytest.approx(1e-4)


@pytest.mark.parametrize("ratio, found", [(0.5 * TH.vanishing_ratio, True), (2 * TH.vanishing_ratio, False)])
def test_vanishing_at_the_threshold(ratio, found):
    run = _vanish(build(), ratio ** 0.25)  # fc0 gets `ratio` of fc4's relative gradient
    assert ("vanishing_gradient" in kinds(diagnose(run))) == found


def test_vanishing_names_the_layers_and_first_step():
    run = _vanish(build(), 0.1, rows=slice(30, None))
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.first_step == 30
    assert f.layers[:2] == ("fc0", "fc1") and "fc4" not in f.layers
    assert f.evidence["backward_ratio"] == pytest.approx(1e-4, rel=0.2)
    assert f.severity == "warning" and not f.evidence["at_init"]


def test_a_last_row_measured_on_a_few_layers_is_no_depth_profile():
    """A GAN's last backward, its generator's alone in a step of its own, reached 2 of its 13
    layers: that row's ratio (0.84 against 3e-10) and its NaN were the finding's evidence, which
    named one layer."""
    run = _vanish(build(), 0.1, rows=slice(30, None))
    last, cols = sampled(run)[-1], [run.column(f"fc{k}") for k in range(3)]
    run.metrics["grad_out_rms"][last, cols] = np.nan
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.layers[:2] == ("fc0", "fc1") and np.isfinite(f.evidence["grad_out_rms_by_layer"]["fc0"])


@pytest.mark.parametrize("factor, severity", [(2.0, "error"), (0.5, "warning")])
def test_vanishing_is_an_error_below_its_threshold(factor, severity):
    """The severity bar is `vanishing_error_ratio`, overridable like every threshold: a ratio is
    an error under a bar twice it, a warning over a bar half of it."""
    from dataclasses import replace
    run = _vanish(build(), 0.1, rows=slice(30, None))
    ratio = next(f for f in diagnose(run) if f.kind == "vanishing_gradient").evidence["backward_ratio"]
    th = replace(TH, vanishing_error_ratio=factor * ratio)
    assert next(f for f in diagnose(run, th) if f.kind == "vanishing_gradient").severity == severity


def test_vanishing_that_soon_recovers_is_not_a_finding():
    run = _vanish(build(n_steps=200), 0.1, rows=slice(0, 25))  # 3 of 20 samples, then healthy
    assert "vanishing_gradient" not in kinds(diagnose(run))


def test_a_vanishing_that_recovered_quotes_the_ratio_it_had_and_the_last_one():
    """A live check of a GELU MLP said "4.6e-01 of the upper layers'... barely learn": the median of a
    tail it had recovered in. The ratio quoted is the one its samples had; the last one is said too."""
    run = _vanish(build(n_steps=100), 0.1, rows=slice(0, 35))  # 4 of 10 samples, then healthy
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.evidence["backward_ratio"] == pytest.approx(1e-4, rel=0.2)
    assert "is 1.0e-04 of the upper layers' since step 0 (1.0e+00 at the last sample)" in f.message


def test_vanishing_needs_persistence():
    run = build(n_steps=200)
    rows = sampled(run)
    _vanish(run, 0.1, rows=rows[3:5])  # two samples only
    assert "vanishing_gradient" not in kinds(diagnose(run))
    _vanish(run, 0.1, rows=rows[5:6])  # three in a row in the middle: 15% of the run, then healthy
    assert "vanishing_gradient" not in kinds(diagnose(run))
    _vanish(run, 0.1, rows=rows[6:8])  # five in a row: a quarter of the run stuck is a finding
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.first_step == run.steps[rows[3]]


@pytest.mark.parametrize("ratio, found", [(0.5 * TH.backward_vanishing_ratio, True),
                                          (2 * TH.backward_vanishing_ratio, False)])
def test_vanishing_of_the_backward_signal_alone(ratio, found):
    """Glorot & Bengio: ∂L/∂s can collapse while weight gradients look level; alone it must pass
    the wider band."""
    run = _vanish(build(), ratio ** 0.25, relative=False)
    assert ("vanishing_gradient" in kinds(diagnose(run))) == found


def test_small_relative_gradient_with_a_level_backward_signal_is_not_vanishing():
    """Inputs scaled by 1e-3 make the first layer's weight gradient tiny; ∂L/∂s is level."""
    run = build()
    run.metrics["grad_norm"][:, run.column("fc0")] *= 1e-4
    assert "vanishing_gradient" not in kinds(diagnose(run))


def test_norm_layers_and_embeddings_are_not_in_the_depth_profile():
    from gradwatch.diagnose.signals import profile_columns
    from gradwatch.store.series import LayerInfo
    run = build()
    run.layers[0] = LayerInfo("emb", "Embedding", 0, "param", 100)
    run.layers[2] = LayerInfo("bn", "BatchNorm1d", 2, "param", 20)
    assert [run.layers[c].name for c in profile_columns(run)] == ["fc2", "fc3", "fc4"]


# ------------------------------------------------------------------ exploding
def _total_growth(run, start, per_step, steps=None):
    n = len(run.steps) if steps is None else start + steps
    growth = per_step ** np.clip(np.arange(len(run.steps)) - start + 1, 0, None)
    growth[n:] = 1.0
    run.metrics["grad_norm"] *= growth[:, None]
    # the step grows with the gradient, as lr·g does: a fixed-length step under a growing gradient
    # is clipping in the script (rules/clipping.py)
    run.metrics["update_ratio"] *= growth[:, None]
    return run


def test_a_blow_up_from_the_first_step_is_clipped_at_one_not_at_its_own_level():
    """A tester's RNN at 3x orthogonal W_hh: its first steps' norm, 1.6e5, was the blow-up's, and
    "twice its healthy level (330000)" left the loss at 9.6e9; clipped at 1.0 it reached 0.60."""
    from gradwatch.diagnose import advice

    ctx = advice.Context(build(optimizer="SGD", lr=0.05))
    evidence = {"growth_over_steps": 2.7e7, "baseline_norm": 1.63e5, "early_norm": 1.63e5}
    clip = lambda ev: next(r for r in advice.exploding(ctx, ("fc0",), ev, False)[1] if "clip_grad_norm_" in r.code)
    assert "max_norm=330000)" in clip({**evidence, "at_init": False}).code
    at_init = clip({**evidence, "at_init": True})
    assert "max_norm=1.0)" in at_init.code and "no healthy level" in at_init.action


def test_a_blow_up_from_the_first_step_of_a_recurrent_net_names_its_recurrent_weights():
    """The same RNN was told of its lr alone; the probe named W_hh's spectral radius, 3."""
    from gradwatch.diagnose import advice

    run = build(optimizer="SGD", lr=0.05)
    run.layers[0] = dataclasses.replace(run.layers[0], type="RNN", role="recurrent", activation="tanh")
    evidence = {"growth_over_steps": 2.7e7, "max_update_ratio": 565.0}
    for at_init in (True, False):
        causes, remedies = advice.exploding(advice.Context(run), ("fc0",), {**evidence, "at_init": at_init}, False)
        assert any(c.startswith("recurrent weight norm") for c in causes) == at_init
        assert any("recurrent weights orthogonally" in r.action for r in remedies) == at_init
    causes, _ = advice.exploding(advice.Context(build()), ("fc0",), {**evidence, "at_init": True}, False)
    assert not any(c.startswith("recurrent weight norm") for c in causes)  # (no recurrent layer)


def test_sustained_growth_is_exploding_at_its_onset():
    run = _total_growth(build(), 40, 1.5)
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    # 1.5^6 > 10: the first of three spikes is step 45. In a 100-step run the first 100 steps
    # hold the blow-up, so an early level taken over them all would wait for it (step 52).
    assert 40 <= f.first_step <= 46
    assert f.evidence["growth_over_steps"] >= TH.spike_factor
    assert any("clip_grad_norm_" in r.code for r in f.remedies)


@pytest.mark.parametrize("n_spike, found", [(TH.spike_steps - 1, False), (TH.spike_steps, True)])
def test_spike_must_last_spike_steps(n_spike, found):
    run = build(optimizer="Adam")
    run.metrics["grad_norm"][50:50 + n_spike] *= 1.5 * TH.spike_factor
    run.metrics["grad_norm"][50 + n_spike:] = np.inf  # ...and the run goes non-finite
    assert ("exploding_gradient" in kinds(diagnose(run))) == found


@pytest.mark.parametrize("factor, found", [(0.5 * TH.jump_factor, False), (2 * TH.jump_factor, True)])
def test_single_jump_against_the_baseline(factor, found):
    run = build(optimizer="Adam")
    run.metrics["grad_norm"][60] *= factor
    run.loss[61:] = np.inf  # ...and the run goes non-finite
    assert ("exploding_gradient" in kinds(diagnose(run))) == found


def test_warmup_steps_only_seed_the_baseline():
    run = build()
    run.metrics["grad_norm"][:TH.warmup_steps] *= 1e-3  # tiny at the very start, then normal
    assert "exploding_gradient" not in kinds(diagnose(run))


@pytest.mark.parametrize("ratio, found", [(0.9 * TH.max_update_ratio, False), (1.5 * TH.max_update_ratio, True)])
def test_update_larger_than_the_weights(ratio, found):
    run = build()
    run.metrics["update_ratio"][sampled(run)[4], run.column("fc2")] = ratio
    found_kinds = kinds(diagnose(run))
    assert ("exploding_gradient" in found_kinds) == found


def test_one_overshoot_the_weights_outgrew_while_the_loss_fell_is_info_and_one_before_a_stall_an_error():
    """A logistic regression at SGD lr 2 moved its small initial weights 1.12x at step 2, then less
    as they grew, and trained to 96%: told to lower its lr 100-fold (92.8% then). A tanh MLP at lr 8
    whose first update was 1.89x its weights stayed at chance: that one is a blow-up."""
    run = build(optimizer="SGD", lr=2.0)
    run.metrics["update_ratio"][sampled(run)[0], run.column("fc2")] = 1.12
    (f,) = [f for f in diagnose(run) if f.kind == "exploding_gradient"]
    assert f.severity == "info" and "the weights outgrew their small start" in f.message
    # the same overshoot where the backward signal already grew toward the input at the first step:
    # weights too large, not small (a tester's 16-layer tanh MLP at N(0, 1), its loss 15 -> 3, the
    # first layer's weights 80 -> 117,343, no gradient reaching it from step 10)
    grown = dataclasses.replace(run, metrics={k: v.copy() for k, v in run.metrics.items()})
    for i, c in enumerate(c for c, l in enumerate(run.layers) if l.role == "param"):
        grown.metrics["grad_out_rms"][0, c] = 0.01 * 100.0 ** (4 - i)
    (f,) = [f for f in diagnose(grown) if f.kind == "exploding_gradient"]
    assert f.severity == "error" and "init_backward_ratio" in f.evidence and "outgrew" not in f.message
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(0).random(len(run.loss))  # the loss stays at chance
    (f,) = [f for f in diagnose(run) if f.kind == "exploding_gradient"]
    assert f.severity == "error"
    # a blow-up the overshoot made, then a fall from it to above where it started (a reviewer's tanh MLP
    # at SGD lr 10: 1.3, then 29, 22... down to 3.25): read from its level before, an error
    run.loss[:] = 3.25 + 26 * np.exp(-np.arange(len(run.loss)) / 10)
    run.loss[0] = 1.3
    (f,) = [f for f in diagnose(run) if f.kind == "exploding_gradient"]
    assert f.severity == "error"


def test_recurring_bursts_within_one_window_are_exploding():
    run = build(n_steps=300, optimizer="Adam")
    for step in (140, 146, 152):
        run.metrics["grad_norm"][step] *= 2 * TH.spike_factor
    run.metrics["grad_norm"][153:] *= 20 * TH.spike_factor  # ...and it does not come back
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.first_step == 140


def test_blips_over_a_converged_tiny_baseline_are_not_exploding():
    run = build(n_steps=300, optimizer="Adam")
    run.metrics["grad_norm"][150:] *= 1e-3  # converged: the gradient is a thousand times smaller
    for start in (180, 220, 260):
        run.metrics["grad_norm"][start:start + 4] *= 50  # blips, still below the early level
    assert "exploding_gradient" not in kinds(diagnose(run))


@pytest.mark.parametrize("height, found", [(1.2, False), (4.0, True)])
def test_late_spikes_must_rise_above_the_early_range_not_only_reach_it(height, found):
    """Near convergence a cross-entropy's gradient is heavy-tailed: its median falls far below
    the early level while a misclassified batch brings it back there. Spikes that only reach the
    early range (x1.2 of its median, inside its 99.9th percentile at sigma 0.25) are that; spikes
    well above it (x4) are an explosion, even as the run ends."""
    run = build(n_steps=300, optimizer="Adam")
    rng = np.random.default_rng(1)
    norms = np.exp(0.25 * rng.standard_normal(300))  # minibatch noise around an early level of 1
    norms[150:] *= 0.02  # converged
    norms[[284, 289, 294]] = height
    run.metrics["grad_norm"][:, run.column("fc0")] = norms
    for c in ("fc1", "fc2", "fc3", "fc4"):
        run.metrics["grad_norm"][:, run.column(c)] = 0.0
    assert ("exploding_gradient" in kinds(diagnose(run))) == found


def test_a_burst_the_run_recovers_from_is_not_a_finding_but_chronic_bursts_are():
    run = build(n_steps=300, optimizer="Adam")
    run.metrics["grad_norm"][100:104] *= 3 * TH.spike_factor  # one catapult, then back to normal
    assert "exploding_gradient" not in kinds(diagnose(run))
    for start in (160, 230):
        run.metrics["grad_norm"][start:start + 4] *= 3 * TH.spike_factor
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.first_step == 100 and f.evidence["bursts"] == TH.chronic_bursts


def test_the_early_level_spans_early_windows():
    """The level the advice clips at: the 90th percentile of the norms of the first `early_windows`
    windows after warm-up (before the burst)."""
    from dataclasses import replace
    from gradwatch.diagnose.signals import total_grad_norm
    run = _total_growth(build(), 40, 1.5)
    total = total_grad_norm(run)
    f = next(f for f in diagnose(run, replace(TH, early_windows=1)) if f.kind == "exploding_gradient")
    w = TH.baseline_window
    assert f.evidence["early_norm"] == pytest.approx(np.percentile(total[TH.warmup_steps:TH.warmup_steps + w], 90))


def test_what_counts_as_recovered_is_a_threshold():
    """Back near its level: below `recovered_factor` times the median before the burst. A bar
    under the healthy level itself leaves the same catapult unrecovered: a finding."""
    from dataclasses import replace
    run = build(n_steps=300, optimizer="Adam")
    run.metrics["grad_norm"][100:104] *= 3 * TH.spike_factor
    assert "exploding_gradient" not in kinds(diagnose(run))
    assert "exploding_gradient" in kinds(diagnose(run, replace(TH, recovered_factor=0.5)))


def test_a_jump_must_top_the_norms_of_jump_history_windows():
    """Jumps 50 steps apart, each as high as the last: against 5 windows (100 steps) only the first
    is a jump, one burst the run recovers from; against 2 (40 steps) each is, chronic bursts."""
    from dataclasses import replace
    run = build(n_steps=300, optimizer="Adam")
    run.metrics["grad_norm"][[50, 100, 150]] *= 2 * TH.jump_factor
    assert "exploding_gradient" not in kinds(diagnose(run))
    assert "exploding_gradient" in kinds(diagnose(run, replace(TH, jump_history_windows=2)))


@pytest.mark.parametrize("grad, found", [(0.9 * 10.0 / 0.1, False), (1.5 * 10.0 / 0.1, True)])
def test_sgd_step_larger_than_the_weights_between_samples(grad, found):
    """Under SGD Δw = lr·g: lr 0.1, ‖w‖ 10, so a gradient above 100 moves the weights by more than
    their norm, even on a step where no update ratio is sampled."""
    run = build(optimizer="SGD", lr=0.1)
    run.metrics["grad_norm"][45, run.column("fc2")] = grad
    assert ("exploding_gradient" in kinds(diagnose(run))) == found
    run.meta["optimizer"] = "Adam"  # Adam's step is not lr·g
    assert "exploding_gradient" not in kinds(diagnose(run))


def test_sgd_step_estimate_is_not_made_under_momentum_and_is_worded_as_one():
    """With momentum the step is lr times a running sum of gradients: lr·g/‖w‖ is no estimate of
    it (a tester's run was told of a 1.17x update that measured 5.29x). Without, the number is
    said to be estimated, not measured."""
    run = build(optimizer="SGD", lr=0.1)
    run.metrics["grad_norm"][45, run.column("fc2")] = 1.5 * 10.0 / 0.1
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["predicted_update_ratio"] == pytest.approx(1.5) and "estimated" in f.message
    assert "max_update_ratio" not in f.evidence
    run.meta["momentum"] = 0.9
    assert "exploding_gradient" not in kinds(diagnose(run))


def test_update_ratio_of_zero_initialised_layer_is_ignored():
    run = build()
    r, c = sampled(run)[0], run.column("fc4")
    run.metrics["weight_norm"][r, c] = 0.0
    run.metrics["update_ratio"][r, c] = np.inf
    assert "exploding_gradient" not in kinds(diagnose(run))


def test_weights_growing_without_bound():
    run = build()
    rows = sampled(run)
    run.metrics["weight_norm"][rows] *= (1.5 ** np.arange(len(rows)))[:, None]  # 38x by the end
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["weight_growth"] == pytest.approx(1.5 ** 9)
    assert f.first_step == run.steps[rows[np.flatnonzero(1.5 ** np.arange(10) >= 10)[0]]]


def test_weights_growing_ever_slower_are_healthy():
    """Weights that grow like sqrt(t) (a random walk) reach 10x over a long run and keep rising,
    yet slow down all the way: not growing without bound (a tester's healthy 100k-step run)."""
    run = build()
    rows = sampled(run)
    t = (run.steps[rows] - run.steps[rows[0]]) / (run.steps[rows[-1]] - run.steps[rows[0]])
    run.metrics["weight_norm"][rows] *= (1 + 12.4 * np.sqrt(t))[:, None]  # 13.4x by the end
    assert "exploding_gradient" not in kinds(diagnose(run))
    run.metrics["weight_norm"][rows] *= (13.4 ** t / (1 + 12.4 * np.sqrt(t)))[:, None]  # the same 13.4x, geometric
    assert next(f for f in diagnose(run) if f.kind == "exploding_gradient").evidence["weight_growth"] == pytest.approx(13.4)


def test_backward_signal_growing_toward_the_input():
    run = build()
    for k in range(4):
        run.metrics["grad_out_rms"][:, run.column(f"fc{k}")] *= 20.0 ** (3 - k)  # 8000x
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["backward_ratio"] == pytest.approx(8000) and f.evidence["at_init"]


def test_initial_weight_scale_is_a_cause_only_when_the_first_step_shows_it():
    """A blow-up from step 0 is not by itself the init's doing (a huge lr overshoots at step 0
    with a backward signal that shrinks toward the input). The init is named, and its remedy
    put first, when the first step's backward signal grows toward the input."""
    run = build(optimizer="SGD", lr=0.1)
    run.metrics["update_ratio"][0, run.column("fc2")] = 1.5  # the first update overshoots
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["at_init"] and not any("initial weight scale" in c for c in f.causes)
    first = sampled(run)[0]
    for k in range(4):
        run.metrics["grad_out_rms"][first, run.column(f"fc{k}")] *= 20.0 ** (3 - k)  # 8000x at step 0 only
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["init_backward_ratio"] == pytest.approx(8000)
    assert "initial weight scale" in f.causes[0] and "gw.init_" in f.remedies[0].code


def test_a_blow_up_from_the_first_step_is_not_told_zclip():
    """ZClip's 25 warm-up steps pass the first steps unclipped: a tester's RNN exploding at step 0
    kept the same loss and finding with it attached as advised. Clipping by norm stays."""
    run = build(optimizer="SGD", lr=0.1)
    run.metrics["update_ratio"][0, run.column("fc2")] = 1.5
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.evidence["at_init"] and any("clip_grad_norm_" in r.code for r in f.remedies)
    assert not any("ZClip" in r.code for r in f.remedies)
    run = build(optimizer="SGD", lr=0.1)
    run.metrics["update_ratio"][sampled(run)[4], run.column("fc2")] = 1.5  # later: ZClip has its history
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert not f.evidence["at_init"] and any("ZClip" in r.code for r in f.remedies)


# ------------------------------------------------------------------ non-finite
def test_non_finite_loss_first_step_and_evidence():
    run = build()
    run.loss[70:] = np.inf
    run.metrics["grad_norm"][70:] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.first_step == 70 and f.severity == "error"
    assert f.evidence["last_finite_loss"] == pytest.approx(run.loss[69])


def test_a_blow_up_within_ten_steps_is_blamed_on_the_learning_rate_not_the_data():
    """Before, the growth before a NaN was measured only with 10 finite steps behind it; a run
    whose gradients grew 1e17x in 6 steps was told to check its batches."""
    run = build(n_steps=8)
    run.metrics["grad_norm"][:6] *= (1e3 ** np.arange(6))[:, None]
    run.loss[6:] = np.inf
    run.metrics["grad_norm"][6:] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.evidence["grad_growth_before"] > 1e14
    assert f.causes[0].startswith("learning rate") and not any("bad input" in c for c in f.causes)
    run.metrics["grad_norm"][:6] = 1.0  # level gradients, then a NaN: the data or the loss
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.causes[0].startswith("bad input data")
    assert "`gradwatch fix -- python train.py` runs the script again" in f.remedies[0].action
    run.meta["command"] = ["my train.py", "--lr", "0.1"]  # the run's own, quoted for the shell
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert "`gradwatch fix -- python 'my train.py' --lr 0.1`" in f.remedies[0].action
    run.meta["distributed"] = {"kind": "ddp", "rank": 0, "world_size": 2}  # each rank's argv is the script's
    f = next(f for f in diagnose(run) if f.kind == "non_finite")  # (a tester's fix without torchrun: "RANK expected")
    assert "`gradwatch fix -- torchrun --nproc_per_node=2 'my train.py' --lr 0.1`" in f.remedies[0].action
    run.meta["distributed"] = {"kind": "ddp", "rank": 0, "world_size": 16, "local_world_size": 8}  # 2 nodes x 8
    f = next(f for f in diagnose(run) if f.kind == "non_finite")  # (it said --nproc_per_node=16, then --nnodes=2)
    assert "`gradwatch fix -- torchrun --nproc_per_node=8 'my train.py' --lr 0.1` on one node" in f.remedies[0].action
    # (`--nnodes=2` with no rendezvous options waits for the other node forever)
    run.meta["distributed"] = {"kind": "ddp", "rank": 0, "world_size": 2}  # mp.spawn: no LOCAL_WORLD_SIZE, one node
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert "--lr 0.1` runs" in f.remedies[0].action and "on one node" not in f.remedies[0].action


def test_non_finite_origin_is_the_first_activation_layer():
    run = build()
    r = sampled(run)[5]
    run.metrics["act_mean"][r, run.column("act2")] = np.inf
    run.metrics["act_mean"][r, run.column("act3")] = np.inf
    run.metrics["grad_norm"][r:] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.first_step == run.steps[r] and f.layers == ("fc2", "act2", "act3")
    assert f.evidence["first_seen_in"] == "activations"
    # a ReLU makes no NaN of finite inputs: it was in the output of the Linear that ran before it
    assert "in the input of 'act2': the output of 'fc2', or an operation on it" in f.message
    run.metrics["grad_norm"][r:, run.column("fc2")] = 1.0  # that Linear's gradients finite: not named
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.layers == ("act2", "act3") and "in the activations in 'act2'" in f.message


def test_a_nan_in_the_batch_is_named_in_the_first_layer_not_the_relu_after_it():
    """A tester's tabular MLP, a feature divided by its zero std: the NaN reaches Linear '0', whose
    output is not measured, and was said to first hit ReLU '1'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    x[3, 2] = float("nan")
    with gw.watch(model, opt, warn=False) as w:
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    f = next(f for f in diagnose(w.series()) if f.kind == "non_finite")
    assert f.layers[0] == "0" and f.first_step == 0
    assert "in the input of '1': the output of '0', or an operation on it" in f.message


def test_non_finite_gradient_in_one_layer():
    run = build()
    run.metrics["nonfinite"][:, :] = np.nan
    run.metrics["nonfinite"][33, run.column("fc1")] = 12
    run.metrics["grad_norm"][33, run.column("fc1")] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert (f.first_step, f.layers, f.evidence["nonfinite_entries"]) == (33, ("fc1",), 12)


def test_skipped_loss_scaler_steps_are_not_findings():
    run = build()
    run.meta["skipped_steps"] = [0, 1, 2, 40]  # recorded as events, never as steps
    assert diagnose(run) == []


def test_not_recorded_is_not_non_finite():
    run = build()
    run.loss[::2] = np.nan  # NaN = not recorded
    run.metrics["grad_norm"][5:9] = np.nan
    assert "non_finite" not in kinds(diagnose(run))


# ------------------------------------------------------------------ units
@pytest.mark.parametrize("frac, found", [(TH.dead_fraction - 0.01, False), (TH.dead_fraction, True)])
def test_dead_units_at_the_threshold(frac, found):
    run = build()
    run.metrics["dead"][sampled(run)[2]:, run.column("act1")] = frac
    assert ("dead_units" in kinds(diagnose(run))) == found


def test_units_dead_from_the_first_step_are_not_blamed_on_the_learning_rate():
    run = build(lr=0.5)
    run.metrics["dead"][:, run.column("act1")] = 1.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.evidence["at_init"] and not any(c.startswith("learning rate") for c in f.causes)
    assert "gw.init_" in f.remedies[0].code
    run = build(lr=0.5)
    run.metrics["dead"][sampled(run)[3]:, run.column("act1")] = 1.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.causes[0].startswith("learning rate") and "LeakyReLU" in f.remedies[0].code


def test_units_dead_at_the_first_step_and_many_more_after_blame_the_steps_too():
    """A tester's ReLU MLP at lr 1: 58% dead at step 0, 100% by step 30, was told "since step 0,
    initial weight scale" alone, and re-initialising left the lr that killed the rest."""
    run = build(lr=1.0)
    rows = sampled(run)
    run.metrics["dead"][rows, run.column("act1")] = 0.58
    run.metrics["dead"][rows[3]:, run.column("act1")] = 1.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.first_step == 0 and "(58% at the first step)" in f.message and f.evidence["dead_at_start"] == 0.58
    assert f.causes[0].startswith("learning rate") and "the updates killed the rest" in f.causes[0]
    assert any(c.startswith("initial weight scale: 58%") for c in f.causes)
    assert any(r.action.startswith("Lower the learning rate") for r in f.remedies)


def test_dead_gelus_are_told_their_own_class_and_a_lower_lr_first():
    """A tester's GPT-2 at lr 3: dead GELUs were told `swap_activations(model, nn.ReLU, ...)`, which
    finds no ReLU and changes nothing."""
    import dataclasses
    for kind, code in (("GELU", "nn.GELU"), ("NewGELUActivation", "NewGELUActivation")):
        run = build(lr=3.0, activation="gelu")
        run.layers = [dataclasses.replace(l, type=kind) if l.role == "activation" else l for l in run.layers]
        run.metrics["dead"][sampled(run)[3]:, run.column("act1")] = 1.0
        f = next(f for f in diagnose(run) if f.kind == "dead_units")
        swap = next(r for r in f.remedies if "swap_activations" in r.code)
        assert f"swap_activations(model, {code}, lambda: nn.LeakyReLU(0.01))  # " in swap.code and "nn.ReLU" not in swap.code
        compile(swap.code, "pasted", "exec")  # (a comment inside the call had made it a SyntaxError)
        assert f"push a {kind} unit's bias" in " ".join(f.causes)
        assert f.remedies[0].action.startswith("Lower the learning rate")
        assert any(c.startswith(f"activation: {kind} passes almost no gradient") for c in f.causes)


def test_layers_that_get_exactly_zero_gradient_are_found_without_activation_modules():
    """ReLUs called as F.relu have no module for the activation statistics: a tester's net with
    every unit of its second ReLU dead was told to use Adam for 'stalled' layers. Exactly zero
    gradient through the end of the run says it; zeros for a few steps (a zero-initialised
    output layer, a ReZero gate) do not."""
    run = build(activation="relu")
    run = run.__class__([l for l in run.layers if l.role != "activation"], run.steps, run.loss, run.lr,
                        {m: v[:, [i for i, l in enumerate(run.layers) if l.role != "activation"]]
                         for m, v in run.metrics.items()}, meta=run.meta)
    for k in (0, 1):
        run.metrics["grad_norm"][:, run.column(f"fc{k}")] = 0.0
        run.metrics["update_ratio"][sampled(run), run.column(f"fc{k}")] = 0.0
        run.metrics["grad_max"][sampled(run), run.column(f"fc{k}")] = 0.0  # every entry 0, as recorded
    found = diagnose(run)
    f = next(f for f in found if f.kind == "dead_units")
    assert f.layers == ("fc0", "fc1") and f.first_step == 0 and f.severity == "error"
    assert "F.leaky_relu" in "".join(r.code for r in f.remedies)
    assert "example_input" in f.remedies[0].code  # init_ sees F.relu only in a forward pass
    assert "stalled_layers" not in kinds(found)  # the same cause, said once
    for k in (0, 1):
        run.metrics["grad_norm"][TH.zero_gradient_steps - 1:, run.column(f"fc{k}")] = 1.0
    assert "dead_units" not in kinds(diagnose(run))
    # the last layer's output multiplied by 0 in the loss (DDP's trick for unused parameters):
    # nothing after it, so nothing is blocked
    run.metrics["grad_norm"][:, run.column("fc4")] = 0.0
    assert "dead_units" not in kinds(diagnose(run))


def test_zero_gradients_below_saturated_units_are_the_saturations():
    """tanh'(x) is exactly 0 in float32 for |x| > 9: a tanh net driven into saturation by an lr
    ramp got a dead_units finding about "ReLU units" it does not have (detection benchmark)."""
    run = build(activation="tanh")
    run.metrics["saturated"][:, run.column("act1")] = 1.0
    for k in (0, 1):
        run.metrics["grad_norm"][:, run.column(f"fc{k}")] = 0.0
    assert "saturation" in kinds(diagnose(run)) and "dead_units" not in kinds(diagnose(run))


def test_dead_units_are_judged_before_the_loss_went_non_finite():
    """53% -> 95% dead before the NaN, then statistics of a NaN net: the finding gives the dying
    units' share, not a median over the NaN steps (a tester saw '0% of the units')."""
    run = build()
    rows = sampled(run)
    run.metrics["dead"][rows, run.column("act1")] = np.linspace(0.53, 0.95, len(rows))
    run.metrics["dead"][rows[6]:, run.column("act1")] = 0.0
    run.loss[rows[6]:] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.evidence["dead_fraction"]["act1"] >= 0.6


def test_dead_units_error_when_nearly_all_dead():
    run = build()
    run.metrics["dead"][:, run.column("act0")] = 0.95
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.severity == "error" and f.layers == ("act0",) and f.evidence["at_init"]


@pytest.mark.parametrize("frac, found", [(TH.saturated_fraction - 0.01, False), (TH.saturated_fraction, True)])
def test_saturation_at_the_threshold(frac, found):
    run = build(activation="sigmoid")
    run.metrics["saturated"][sampled(run)[3]:, run.column("act2")] = frac
    f = [f for f in diagnose(run) if f.kind == "saturation"]
    assert bool(f) == found
    if found:
        assert f[0].layers == ("act2",) and f[0].first_step == 30


def test_a_first_layer_saturated_from_the_start_is_told_to_standardise_its_inputs():
    """Inputs left at 0..16 saturate the first tanh layer whatever its init: a tester measured
    gw.init_, then the first remedy, raising its saturation from 51% to 81%."""
    run = build(activation="tanh")
    run.metrics["saturated"][:, run.column("act0")] = 0.6
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert "Standardise the inputs" in f.remedies[0].action and f.causes[1].startswith("input scale")
    # every layer saturated from the start: those above take the first's bounded outputs, so the
    # weights are too large (a tester's 16-layer tanh MLP at N(0, 1) on standardised inputs was told
    # to standardise them)
    run.metrics["saturated"][:, [run.column(f"act{k}") for k in range(4)]] = 0.99
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert not any(c.startswith("input scale") for c in f.causes) and f.causes[1].startswith("initial weight scale")
    assert not any(r.action.startswith("Standardise the inputs") for r in f.remedies)
    run = build(activation="tanh")
    run.metrics["saturated"][:, run.column("act2")] = 0.6  # a layer the inputs do not feed
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert not any("Standardise" in r.action for r in f.remedies)


def test_the_outputs_own_sigmoid_is_not_saturation():
    """A sigmoid before BCELoss saturates as its predictions grow confident (a tester's classifier
    at 99.8% accuracy got an 86% saturation warning, and the advised swap to LeakyReLU broke
    BCELoss). Only activations with a weight layer after them count."""
    from gradwatch.store.series import LayerInfo
    run = build(activation="sigmoid")
    out = LayerInfo("out_act", "Sigmoid", 99, "activation", 0, "sigmoid")
    run = run.__class__([*run.layers, out], run.steps, run.loss, run.lr,
                        {m: np.concatenate([v, np.full((len(v), 1), np.nan)], axis=1) for m, v in run.metrics.items()},
                        meta=run.meta)
    run.metrics["saturated"][sampled(run), run.column("out_act")] = 0.9
    assert "saturation" not in kinds(diagnose(run))
    run.metrics["saturated"][sampled(run), run.column("act3")] = 0.9  # a hidden one
    assert "saturation" in kinds(diagnose(run))


def test_relu_layers_are_never_saturated():
    run = build()
    run.metrics["saturated"][:, run.column("act1")] = 1.0
    assert "saturation" not in kinds(diagnose(run))


# ------------------------------------------------------------------ updates
def test_stalled_lower_layers():
    run = build()
    run.metrics["update_ratio"][sampled(run), run.column("fc0")] = 0.5 * TH.stalled_ratio * 1e-3
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert f.layers == ("fc0",) and not f.evidence.get("frozen")


def test_stalled_explained_by_vanishing_is_folded_into_it():
    run = _vanish(build(), 0.1)
    for k in range(5):
        run.metrics["update_ratio"][:, run.column(f"fc{k}")] *= 0.1 ** (4 - k)
    assert kinds(diagnose(run)).count("stalled_layers") == 0
    assert "vanishing_gradient" in kinds(diagnose(run))


def test_stalled_below_dead_units_is_folded_into_them():
    """Dead ReLUs pass no gradient down, so the layers under them stall for that reason alone;
    'use Adam' would not move them (the tester's script already used Adam)."""
    run = build(optimizer="Adam", lr=1e-3)
    run.metrics["dead"][:, run.column("act1")] = 0.99
    for k in (0, 1):
        run.metrics["update_ratio"][sampled(run), run.column(f"fc{k}")] = 0.5 * TH.stalled_ratio * 1e-3
    assert kinds(diagnose(run)).count("stalled_layers") == 0 and "dead_units" in kinds(diagnose(run))
    run.metrics["dead"][:, run.column("act1")] = 0.05  # no dead units: the stall is a finding of its own
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert not any("torch.optim.Adam" in r.code for r in f.remedies)  # already adaptive


def test_weights_that_stop_changing():
    run = build()
    run.metrics["update_ratio"][50:][~np.isnan(run.metrics["update_ratio"][50:])] = 0.0
    run.loss[50:] = run.loss[50]  # still weights, a still loss
    f = next(f for f in diagnose(run) if f.kind == "stalled_layers")
    assert f.evidence["frozen"] and f.first_step == 50 and len(f.layers) == 5


def test_weights_still_at_every_sample_under_a_falling_loss_change_between_the_samples():
    """A tester's gw.watch(model) without its optimizer, two micro-batches a step: each sampled
    backward was the first of a pair, with no update after it, and "All weights stopped changing"
    was said while the validation error halved."""
    run = build()
    run.metrics["update_ratio"][~np.isnan(run.metrics["update_ratio"])] = 0.0
    assert "stalled_layers" not in kinds(diagnose(run))  # the loss fell 2.1 -> 0.1: they moved
    # but not weights the watch knows are in no optimizer, nor under a GAN's mixed loss, which falls
    # with the other model's training (a reviewer's generator given D's parameters by a typo)
    for meta in ({"outside_optimizers": [l.name for l in run.layers if l.role == "param"]}, {"own_loss_steps": [1]}):
        assert "stalled_layers" in kinds(diagnose(dataclasses.replace(run, meta={**run.meta, **meta}))), meta
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    assert "stalled_layers" in kinds(diagnose(run))


def test_zero_learning_rate_is_not_frozen_weights():
    run = build()
    run.metrics["update_ratio"][50:] = 0.0
    run.lr[50:] = 0.0  # end of a schedule
    assert "stalled_layers" not in kinds(diagnose(run))


# ------------------------------------------------------------------ loss
def test_loss_plateau():
    run = build()
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    assert "loss_plateau" in kinds(diagnose(run))


def test_a_loss_that_fell_and_rose_back_is_told_the_lr_overshot_not_that_it_is_too_small():
    """A tester's CNN under OneCycleLR at max_lr 0.6: 2.30 -> 1.69 -> 2.31 as the lr rose, and the
    plateau said its lr "may be too small" and to raise it tenfold."""
    from gradwatch.fix.candidates import from_findings

    run = build(n_steps=100)
    noise = 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    dip = 0.6 * np.exp(-((np.arange(len(run.loss)) - 45) / 15.0) ** 2)  # down to 1.7 by step 45, then back
    run.loss[:] = 2.3 - dip + noise
    plateau = next(f for f in diagnose(run) if f.kind == "loss_plateau")
    assert abs(plateau.evidence["loss_low"] - 1.7) < 0.05 and 40 <= plateau.evidence["loss_low_step"] <= 50
    assert "overshoots" in plateau.causes[0] and plateau.remedies[0].action.startswith("Lower the learning rate")
    assert "then rose back" in plateau.message
    assert [c.name for c in from_findings([plateau], set())][0] == "learning rate x0.1"
    # a fall that began inside the start's window (a tester's MLP at max_lr 0.6: 2.30 -> 0.36 by
    # step 40 of 400, back to 2.30), whose lower quartile the dip's did not pass
    early = build(n_steps=400)
    steps = np.arange(len(early.loss))
    early.loss[:] = 2.3 - 1.5 * np.exp(-((steps - 40) / 12.0) ** 2) + 0.01 * np.sin(steps)
    assert "loss_low" in next(f for f in diagnose(early) if f.kind == "loss_plateau").evidence
    run.loss[:] = 2.3 - dip / 10 + noise  # a dip within the noise of a flat run: still the plateau's advice
    flat = next(f for f in diagnose(run) if f.kind == "loss_plateau")
    assert "loss_low" not in flat.evidence and flat.remedies[0].action.startswith("Raise the learning rate")
    # a reviewer's flat, noisy loss (per-batch MSE of a model learning nothing): the least of ~180
    # windows' medians dipped 10% by chance alone in 44 of 200 runs, told to lower the lr
    told = 0
    for seed in range(40):
        noisy = build(n_steps=200)
        noisy.loss[:] = np.random.default_rng(seed).chisquare(16, len(noisy.loss)) / 16
        told += any("loss_low" in f.evidence for f in diagnose(noisy) if f.kind == "loss_plateau")
    assert told == 0


@pytest.mark.parametrize("update_ratio,plateau", [(2e-7, True), (1e-3, False)])
def test_a_noisy_loss_on_still_weights_is_a_plateau_though_it_ends_higher(update_ratio, plateau):
    """SGD at lr 1e-6 on noisy batches: the last tenth's median ended 10.6% above the first's, in
    the gap between a plateau (within 1%, at most 10% worse) and divergence, and nothing was said.
    With the weights barely moving, a rise within the start's spread is batch noise; with real
    updates (a too-high lr) a rising loss is no plateau, whose advice would be a higher lr."""
    run = build(n_steps=200)
    run.loss[:] = 12.4 + np.resize([-2.0, 2.0, -1.0, 1.0], len(run.loss))  # batch noise, interquartile range 2.5
    run.loss[-20:] += 1.5  # ends 12% higher: within that range
    run.metrics["update_ratio"][sampled(run)] = update_ratio
    assert ("loss_plateau" in kinds(diagnose(run))) == plateau


def test_lr_advice_under_a_warm_up_names_the_peak():
    """A warm-up from 0 (Hugging Face's linear schedule): the lr the script configures is the peak,
    and 'group['lr'] = x' would be undone by the scheduler at its next step."""
    run = build()
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    run.lr[:] = np.minimum(np.arange(len(run.lr)) / 20, 1.0) * 1e-3
    f = next(f for f in diagnose(run) if f.kind == "loss_plateau")
    assert f.remedies[0].action == "Raise the learning rate tenfold (to 0.01)"
    assert "peak_lr = 0.01" in f.remedies[0].code and "group['lr']" not in f.remedies[0].code
    assert "0.001 (the schedule's peak)" in f.causes[0]


def test_a_plateau_from_a_vanishing_gradient_points_at_it_not_at_the_learning_rate():
    """A vanishing gradient times ten is still one: the plateau's advice is the cause's."""
    run = _vanish(build(), 0.1)
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    found = diagnose(run)
    vanish, plateau = (next(f for f in found if f.kind == k) for k in ("vanishing_gradient", "loss_plateau"))
    assert plateau.remedies[0] == vanish.remedies[0] and "follows from the vanishing gradient found" in plateau.message
    assert not any("Raise the learning rate" in r.action for r in plateau.remedies)


def test_a_plateau_from_the_start_does_not_follow_from_units_that_died_late():
    """A tester's contrastive model, flat from step 0, was told its plateau followed from dead units
    that began at step 230 of 300: the loss was flat before them."""
    run = build(n_steps=300)
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(1).standard_normal(len(run.loss))
    rows = sampled(run)
    run.metrics["dead"][rows[23]:, run.column("act1")] = 1.0
    found = diagnose(run)
    dead, plateau = (next(f for f in found if f.kind == k) for k in ("dead_units", "loss_plateau"))
    assert dead.first_step == 230 and "follows from" not in plateau.message
    run.metrics["dead"][rows[1]:, run.column("act1")] = 1.0  # dead from the start: it does
    assert "follows from the dead units found" in next(f for f in diagnose(run) if f.kind == "loss_plateau").message


def test_adam_with_a_learning_rate_far_too_high_is_told_to_lower_it_first():
    """Adam moves each weight by about lr per step whatever the gradient: clipping the norm does
    not shorten the step, lowering lr does."""
    run = build(optimizer="Adam", lr=1.0)
    rows = sampled(run)
    run.metrics["weight_norm"][rows] *= (1.5 ** np.arange(len(rows)))[:, None]
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.remedies[0].action == "Lower the learning rate tenfold (to 0.1)" and f.causes[0].startswith("learning rate: 1 with Adam")


def test_loss_that_converged_is_not_a_plateau():
    run = build()
    run.loss[20:] = run.loss[20]  # fell, then flat
    assert "loss_plateau" not in kinds(diagnose(run))


def test_loss_divergence_and_its_onset():
    run = build()
    run.loss[60:] = run.loss[59] * 1.2 ** np.arange(1, 41)
    f = next(f for f in diagnose(run) if f.kind == "loss_divergence")
    assert 60 <= f.first_step <= 75


def test_noisy_loss_is_not_divergence():
    run = build()
    run.loss[::7] *= 5  # spikes in one batch of seven
    assert "loss_divergence" not in kinds(diagnose(run))


def test_single_sample_losses_on_a_flat_run_are_not_divergence():
    """Batch size 1, squared errors (χ²₁), 200 flat steps: the median of a later window reached 3x
    the first window's in about a third of runs (here 8 of 20 seeds fired before); a 5x rise is
    still found."""
    run = build(n_steps=200)
    for seed in range(20):
        run.loss[:] = np.random.default_rng(seed).chisquare(1, 200)
        assert "loss_divergence" not in kinds(diagnose(run)), seed
    run.loss[100:] *= 5 * 4  # a rise far beyond the noise
    f = next(f for f in diagnose(run) if f.kind == "loss_divergence")
    assert 100 <= f.first_step <= 125


# ------------------------------------------------------------------ through time
@pytest.mark.parametrize("rate, kind", [(0.7, "vanishing_gradient"), (1.4, "exploding_gradient"), (0.95, None)])
def test_through_time(rate, kind):
    run = build()
    t = np.arange(30)
    profile_steps = run.steps[sampled(run)]
    profile = np.tile(rate ** (29 - t), (len(profile_steps), 1))  # ∂L/∂x_t ~ rate^(T-t)
    run.time_profiles["rnn"] = (profile_steps, profile)
    found = [f for f in diagnose(run) if f.layers == ("rnn",)]
    assert kinds(found) == ([kind] if kind else [])
    if kind:
        assert found[0].evidence["per_step_factor"] == pytest.approx(rate, rel=0.05)


def test_a_gradient_that_underflows_through_time_is_said_so():
    """‖∂L/∂x_0‖ = 0 exactly (float underflow over 100 tanh steps): 'shrinks by 0x per step' said nothing."""
    run = build()
    profile = np.tile(0.5 ** (99 - np.arange(100)), (10, 1))
    profile[:, :20] = 0.0
    run.time_profiles["rnn"] = (run.steps[sampled(run)], profile)
    f = next(f for f in diagnose(run) if f.layers == ("rnn",))
    assert "no gradient reaches the first of 100 steps (it underflows to 0)" in f.message and "0x" not in f.message


def test_short_sequences_are_not_judged():
    run = build()
    run.time_profiles["rnn"] = (run.steps[sampled(run)], np.tile(0.1 ** np.arange(5)[::-1], (10, 1)))
    assert diagnose(run) == []


# ------------------------------------------------------------------ the findings themselves
def test_finding_json_schema_round_trips():
    run = _total_growth(_vanish(build(), 0.1), 40, 1.5)
    run.loss[90:] = np.inf
    findings = diagnose(run)
    assert {"vanishing_gradient", "exploding_gradient", "non_finite"} <= set(kinds(findings))
    data = json.loads(json.dumps([f.to_dict() for f in findings], default=float))
    for d in data:
        assert set(d) == {"kind", "severity", "first_step", "layers", "message", "evidence", "causes", "remedies"}
        assert d["message"] and d["causes"] and all(set(r) == {"action", "code"} for r in d["remedies"])
        assert isinstance(d["first_step"], int) and isinstance(d["layers"], list)
    assert [Finding.from_dict(d).kind for d in data] == kinds(findings)
    assert [f.first_step for f in findings] == sorted(f.first_step for f in findings)


def test_causes_name_the_saturating_activation():
    run = _vanish(build(activation="sigmoid"), 0.1)
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.causes[0].startswith("saturating activation") and "sigmoid" in f.causes[0]
    assert "swap_activations(model, nn.Sigmoid" in f.remedies[0].code


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown finding kind"):
        Finding("sadness", "error", 0, (), "x")


def test_long_run_that_learnt_early_is_not_a_plateau():
    run = build(n_steps=2000)  # the loss falls in the first ~100 steps, then stays converged
    assert "loss_plateau" not in kinds(diagnose(run))


def test_sgd_prediction_is_not_used_where_samples_show_clipping():
    """A script that clips: the gradient is large, the sampled update is small, so lr·g is not the
    step and the per-step overshoot estimate must not fire."""
    run = build(optimizer="SGD", lr=0.1)
    run.metrics["grad_norm"][:] = 200.0  # lr·g/‖w‖ = 2 everywhere
    run.metrics["update_ratio"][sampled(run)] = 1e-3  # ...but the steps taken were tiny
    assert "exploding_gradient" not in kinds(diagnose(run))
    run.metrics["update_ratio"][sampled(run)] = np.nan  # without samples to tell, it is trusted
    assert "exploding_gradient" in kinds(diagnose(run))


def test_layers_followed_by_batchnorm_are_judged_by_their_backward_signal():
    """BatchNorm makes ∂L/∂W ∝ 1/‖W‖: inflated weights shrink the relative gradient without any
    vanishing of the backward signal."""
    from gradwatch.store.series import LayerInfo
    run = build()
    layers = []
    for layer in run.layers:  # put a BatchNorm after every hidden Linear
        layers.append(layer)
    for k in range(4):
        pos = run.layers.index(next(l for l in run.layers if l.name == f"fc{k}"))
        run.layers[pos] = LayerInfo(f"fc{k}", "Linear", 3 * k, "param", 100)
    for i, l in enumerate(run.layers):
        if l.role == "activation":
            k = int(l.name[3:])
            run.layers[i] = LayerInfo(l.name, l.type, 3 * k + 2, "activation", 0, l.activation)
    run.layers[run.column("fc4")] = LayerInfo("fc4", "Linear", 12, "param", 100)
    bn = [LayerInfo(f"bn{k}", "BatchNorm1d", 3 * k + 1, "param", 20) for k in range(4)]
    run.layers.extend(bn)
    for m, a in run.metrics.items():
        run.metrics[m] = np.concatenate([a, np.full((len(run.steps), 4), np.nan)], axis=1)
    _vanish(run, 0.1, backward=False)  # relative gradients collapse (weights inflated)...
    assert "vanishing_gradient" not in kinds(diagnose(run))  # ...but ∂L/∂s is level


def test_heavy_tailed_gradients_at_batch_size_one_are_not_exploding():
    run = build(n_steps=400, optimizer="Adam")
    noise = np.random.default_rng(3).lognormal(0.0, 1.5, size=400)  # per-sample gradient norms
    run.metrics["grad_norm"] *= noise[:, None]
    assert "exploding_gradient" not in kinds(diagnose(run))
    run.metrics["grad_norm"][300:] *= (1.5 ** np.arange(1, 101))[:, None]  # a real blow-up still shows
    assert "exploding_gradient" in kinds(diagnose(run))


def test_a_loss_that_got_worse_is_not_a_plateau():
    run = build()
    run.loss[:] = np.linspace(2.0, 3.0, len(run.loss))  # +50%: worse, not flat (and not yet diverged)
    assert "loss_plateau" not in kinds(diagnose(run))


def test_one_ranks_non_finite_loss_is_reported_with_the_rank():
    run = build()
    run.meta["rank_non_finite"] = [[7, "rank 1: loss nan"]]
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.first_step == 7 and "rank 1: loss nan" in f.message
    # the NaN the synchronised gradients carried into the stored run at that step: one finding,
    # naming the rank, with the run's evidence (the growth before it, the layers hit)
    run.loss[7:] = np.inf
    run.metrics["grad_norm"][7:] = np.inf
    found = [f for f in diagnose(run) if f.kind == "non_finite"]
    assert len(found) == 1 and "rank 1: loss nan" in found[0].message
    assert found[0].layers and np.isfinite(found[0].evidence["grad_growth_before"])
    assert "too few finite steps" not in " ".join(found[0].causes)


def test_through_time_vanishing_that_the_net_outgrows_is_not_a_finding():
    """An LSTM starts with forget gates near 0.5 (short memory) and learns to remember."""
    run = build()
    t = np.arange(30)
    steps = run.steps[sampled(run)]
    rates = np.where(np.arange(len(steps)) < 5, 0.6, 0.97)  # vanishing for half the run, then not
    run.time_profiles["lstm"] = (steps, np.array([r ** (29 - t) for r in rates]))
    assert [f for f in diagnose(run) if f.layers == ("lstm",)] == []


def test_phases_are_diagnosed_one_by_one():
    """Two models trained one after the other: the second starts at its own, higher loss. As one
    run that jump is a divergence; as two phases it is two healthy trainings. A fault inside one
    phase is still found, at its own step."""
    import numpy as np

    first, second = build(n_steps=100), build(n_steps=100)
    run = build(n_steps=200)
    run.loss[:] = np.concatenate([first.loss * 0.05, second.loss])  # 0.1 at the end of phase 1, 2.1 at the start of 2
    assert "loss_divergence" in kinds(diagnose(run))
    run.meta["phase_starts"] = [100]
    assert "loss_divergence" not in kinds(diagnose(run))
    run.metrics["grad_norm"][150:, 0] = float("nan")
    run.metrics["nonfinite"][150:, 0] = 3
    found = [f for f in diagnose(run) if f.kind == "non_finite"]
    assert found and found[0].first_step == 150


def test_a_norm_that_underflowed_to_0_is_no_layer_cut_off():
    """A 48-layer sigmoid net: entries of 1e-30 square to 0 in float32, the stored norm is 0 while
    max |g| is 1e-30. It was an ERROR dead_units ('ReLU units ... He init') for a sigmoid net."""
    run = build(activation="sigmoid")
    c = run.column("fc0")
    run.metrics["grad_norm"][:, c] = 0.0
    rows = sampled(run)
    run.metrics["grad_max"][rows, c] = 0.0
    assert "dead_units" in kinds(diagnose(run))  # the premise: every entry 0 reads cut off
    run.metrics["grad_max"][rows, c] = 1e-30
    assert "dead_units" not in kinds(diagnose(run))


def test_row_percentiles_are_numpys():
    """The spike rule's per-window percentile, vectorised (numpy's loops over rows with a NaN),
    gives numpy's own numbers: NaN holes, inf, all-NaN rows, single values."""
    import warnings

    from gradwatch.diagnose.signals import row_nanpercentile

    rng = np.random.default_rng(0)
    for width in (1, 2, 5, 20):
        rows = np.exp(rng.standard_normal((300, width)))
        rows[rng.random(rows.shape) < 0.3] = np.nan
        rows[rng.random(rows.shape) < 0.02] = np.inf
        rows[0] = np.nan
        for q in (0, 25, 75, 99.9, 100):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = np.nanpercentile(rows, q, axis=1)
            np.testing.assert_array_equal(row_nanpercentile(rows, q), expected)


# ------------------------------------------------------------------ advice a tester checked by hand
def test_an_overshoot_from_a_modest_gradient_is_the_learning_rates_and_the_cut_is_measured():
    """A tanh MLP under SGD at lr 8: the first update is 1.89x the weights from a gradient 0.24x
    of them. Told to clip at 1.0 first, it reached 35% accuracy; lr / 10 (ratio 0.19) stayed at
    10%; lr / 100 reached 93%. The cut brings the measured ratio below a tenth."""
    run = build(optimizer="SGD", lr=8.0)
    run.metrics["update_ratio"][0, run.column("fc2")] = 1.89
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.remedies[0].action == "Lower the learning rate 100-fold (to 0.08)"
    assert "group['lr'] = 0.08" in f.remedies[0].code
    # the same overshoot at lr 1e-4 is a gradient 1.9e4 times its weights: the gradient's fault
    run = build(optimizer="SGD", lr=1e-4)
    run.metrics["update_ratio"][0, run.column("fc2")] = 1.89
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.remedies[0].action.startswith("Clip the gradient norm")
    assert any(r.action == "Lower the learning rate tenfold (to 1e-05)" for r in f.remedies)


def test_saturation_the_updates_caused_is_cured_by_a_lower_learning_rate_not_a_new_init():
    """The same run saturated its tanh layers from step 10 (not at init): re-initialising (the
    first remedy it was given) restores weights the same lr saturates again."""
    run = build(activation="tanh", lr=8.0)
    run.metrics["update_ratio"][0, run.column("fc2")] = 1.89
    run.metrics["saturated"][sampled(run)[1]:, run.column("act1")] = 0.92
    run.metrics["saturated"][sampled(run)[1]:, run.column("act3")] = 1.0
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert f.remedies[0].action == "Lower the learning rate 100-fold (to 0.08)"
    assert "100% of the outputs of 'act3'" in f.message  # the share said is the layer's that has it
    run = build(activation="tanh")
    run.metrics["saturated"][:, run.column("act1")] = 0.92  # from the first step: the init
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert "gw.init_" in f.remedies[0].code


def test_stalled_below_saturated_units_is_folded_into_the_saturation():
    """Saturated tanh units pass < 1% of the gradient (exactly 0 beyond |x| > 9 in float32): the
    layers under them stall for that reason, and 'use an optimizer with per-parameter step sizes'
    (what the tester was told) would not move them."""
    run = build(activation="tanh")
    run.metrics["saturated"][sampled(run)[1]:, run.column("act3")] = 1.0
    for k in (0, 1, 2):
        run.metrics["update_ratio"][sampled(run)[1:], run.column(f"fc{k}")] = 1e-9
    found = kinds(diagnose(run))
    assert "saturation" in found and "stalled_layers" not in found
    run.metrics["saturated"][:, run.column("act3")] = 0.01  # nothing saturated: a stall of its own
    assert "stalled_layers" in kinds(diagnose(run))


def _without_activation_modules(run):
    keep = [i for i, l in enumerate(run.layers) if l.role != "activation"]
    return run.__class__([run.layers[i] for i in keep], run.steps, run.loss, run.lr,
                         {m: v[:, keep] for m, v in run.metrics.items()}, meta=run.meta)


def test_all_zero_initial_weights_are_named_not_relus():
    """An MLP initialised with zeros, calling torch.tanh: no unit differs from another and no
    gradient passes down. It was told 'biases or weights start too negative' and 'ReLU passes no
    gradient' (it has no ReLU) and to use Leaky ReLU. The weight norms of 0 at step 0 say it."""
    run = _without_activation_modules(build(activation="tanh"))
    rows = sampled(run)
    for k in range(5):
        run.metrics["weight_norm"][0, run.column(f"fc{k}")] = 0.0
    for k in range(4):
        run.metrics["grad_norm"][:, run.column(f"fc{k}")] = 0.0
        run.metrics["grad_max"][rows, run.column(f"fc{k}")] = 0.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.causes[0].startswith("initial weights: 'fc0', 'fc1', 'fc2' and 2 more start with all parameters exactly 0")
    assert len(f.causes) == 1 and "ReLU" not in f.causes[0]
    assert [r.code for r in f.remedies] == ["gw.init_(model, example_input=batch)  # batch: one input batch; the forward shows F.relu & co."]
    for k in range(4):  # only the output layer starts at 0 (on purpose): not the cause
        run.metrics["weight_norm"][0, run.column(f"fc{k}")] = 10.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert "zero_weight_layers" not in f.evidence and not f.causes[0].startswith("initial weights")


def test_a_nan_right_after_an_explosion_is_blamed_on_it_not_on_the_data():
    """A vanilla RNN's first update was 83x its weights and its loss NaN at step 1: with no finite
    steps to measure growth over, the NaN was blamed first on 'bad input data'."""
    run = build(optimizer="SGD", lr=1e-4)
    run.metrics["update_ratio"][0, run.column("fc2")] = 83.0
    run.loss[1:] = np.inf
    run.metrics["grad_norm"][1:] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.causes[0].startswith("exploding_gradient: gradients explode from step 0")
    assert f.remedies[0].action.startswith("Clip the gradient norm") and "exploding gradient" in f.message
    assert "too few finite steps" in f.causes[1]
    run = build()  # a NaN with nothing exploding before it keeps the data first
    run.loss[1:] = np.inf
    run.metrics["grad_norm"][1:] = np.inf
    f = next(f for f in diagnose(run) if f.kind == "non_finite")
    assert f.causes[0].startswith("bad input data")


def test_dead_units_under_adam_at_a_high_learning_rate_name_it():
    """Adam at lr 0.1 killed 72% of a ReLU layer (measured over the whole data set) in its first
    update; the causes named only the activation."""
    run = build(optimizer="Adam", lr=0.1)
    run.metrics["dead"][sampled(run)[1]:, run.column("act1")] = 0.75
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert f.causes[0].startswith("learning rate: a large step (0.1)")
    run = build(optimizer="Adam", lr=1e-3)
    run.metrics["dead"][sampled(run)[1]:, run.column("act1")] = 0.75
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    assert not any(c.startswith("learning rate") for c in f.causes)


def test_units_that_saturate_while_the_loss_keeps_falling_are_info():
    """A tanh classifier (Adam, 99% accuracy) saturated 65% of its top hidden layer from step 20
    while its loss fell 0.10 -> 0.022: a warning that 'almost no gradient passes' was wrong."""
    run = build(activation="tanh", optimizer="Adam", lr=1e-2)  # the loss falls 2.1 -> 0.11
    run.metrics["saturated"][sampled(run)[2]:, run.column("act3")] = 0.65
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert f.severity == "info" and "the loss still fell" in f.message and f.evidence["loss_since_onset"][1] < 0.2
    run.loss[:] = 2.0 + 0.02 * np.random.default_rng(0).random(len(run.loss))  # flat: it blocks learning
    f = next(f for f in diagnose(run) if f.kind == "saturation")
    assert f.severity == "error" and "almost no gradient passes" in f.message  # and the plateau follows from it


def test_a_short_memory_the_task_did_not_need_is_info():
    """A GRU whose label sits in the last 5 of 100 tokens learnt it (loss 0.45 -> 0.0005) with a
    gradient at the first token 1e-16 of the last's: no warning. A loss that fell only to the
    mean's (a vanilla RNN on the adding problem: 0.26 -> 0.16) keeps it."""
    run = build(n_steps=300)
    run.time_profiles["rnn"] = (run.steps[::10], np.tile(np.logspace(-16, 0, 100), (30, 1)))
    run.loss[:] = 0.45 * np.exp(-run.steps / 30) + 1e-4
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.severity == "info" and f.evidence["loss_start_end"][1] <= TH.time_learnt_loss * f.evidence["loss_start_end"][0]
    run.loss[:] = 0.26 - 0.1 * (run.steps / 300)
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.severity == "warning"
    # a tester's LSTM, its label in the last 5 of 60 steps, 95.7%: 0.69 -> 0.10 on a noisy mini-batch loss
    run.loss[:] = 0.08 + 0.61 * np.exp(-run.steps / 100) + 0.03 * np.random.default_rng(0).random(len(run.loss))
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.severity == "info"
    # a regression that learnt its targets' mean early, then stayed (a reviewer's adding problem: 0.94 -> 0.17)
    run.loss[:] = np.maximum(0.94 - 0.77 * run.steps / 50, 0.17) + 0.01 * np.random.default_rng(0).random(len(run.loss))
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.severity == "warning"


def test_a_cut_of_many_decades_is_said_as_a_power_of_ten():
    """lr 1e5 under SGD: each step ~1.05e4 times the weights from a gradient a tenth of them."""
    run = build(optimizer="SGD", lr=1e5)
    rows, cols = sampled(run), [run.column(f"fc{k}") for k in range(5)]
    run.metrics["update_ratio"][np.ix_(rows, cols)] = 1e5 * run.metrics["grad_norm"][np.ix_(rows, cols)] / 10.0
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.remedies[0].action == "Lower the learning rate 1e+06-fold (to 0.1)"  # 1.05e4 -> 0.0105


def test_a_loss_that_blows_up_within_the_first_window_diverges():
    """A tanh MLP under SGD at lr 8: 2.3, 2.45, 66, 297, then ~450 to the end. The first window's
    median (the start) was already ~430, so the rise went unseen. The first two losses stand for
    the start too, at a bar of 100x; noise does not reach it (44 recorded healthy, flat or stalled
    runs peaked at 1.05x)."""
    run = build(n_steps=200)
    rng = np.random.default_rng(0)
    run.loss[:] = 450 * np.exp(0.3 * rng.standard_normal(200))
    run.loss[:4] = [2.32, 2.45, 66.0, 297.0]
    f = next(f for f in diagnose(run) if f.kind == "loss_divergence")
    assert f.first_step == 3 and f.evidence["loss_start"] == pytest.approx(2.45)
    # heavy-tailed batch noise (squared errors at batch size 1, χ²₁) on a falling loss: its first
    # two batches are not 100x below the rest (~0.1% of runs)
    run = build(n_steps=1000)
    for seed in range(20):
        run.loss[:] = (1 + 2 * np.exp(-run.steps / 100)) * np.random.default_rng(seed).chisquare(1, 1000)
        assert "loss_divergence" not in kinds(diagnose(run)), seed


def _vanishing_through_time_in(kind: str):
    """The finding for a recurrent layer of type `kind` whose gradient decays 0.7x per time step."""
    import dataclasses

    run = build()
    at = run.layers.index(next(l for l in run.layers if l.role == "param"))
    run.layers[at] = dataclasses.replace(run.layers[at], type=kind, role="recurrent")
    steps = run.steps[sampled(run)]
    run.time_profiles[run.layers[at].name] = (steps, np.tile(0.7 ** (29 - np.arange(30)), (len(steps), 1)))
    return next(f for f in diagnose(run) if f.layers == (run.layers[at].name,))


def test_an_lstm_vanishing_through_time_is_told_to_open_its_forget_gates_first():
    """Measured (docs/probe.md): an LSTM's gradient horizon went from 14 steps to 38 with forget bias
    1, and to 12 with orthogonal W_hh, which had been the first remedy."""
    f = _vanishing_through_time_in("LSTM")
    assert f.remedies[0].action.startswith("Open the LSTM forget gates")
    assert any("orthogonal" in r.action for r in f.remedies[1:])


def test_a_vanilla_rnn_vanishing_through_time_gets_a_drop_in_gru_that_runs_pasted():
    """`nn.LSTM(...)  # instead of nn.RNN` broke a tester's loop that passes h0 (an LSTM wants (h, c))."""
    code = next(r.code for r in _vanishing_through_time_in("RNN").remedies if "GRU" in r.action)
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.RNN(3, 5, batch_first=True), "head": nn.Linear(5, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = {"gw": gw, "model": model, "optimizer": optimizer}
    exec(code, scope)
    model = scope["model"]
    out, h = model["rnn"](torch.randn(2, 4, 3), torch.zeros(1, 2, 5))  # the loop as it was, h0 passed
    assert isinstance(model["rnn"], nn.GRU) and h.shape == (1, 2, 5)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


# ------------------------------------------------------------------ shared helpers
def test_a_message_lists_the_first_few_names_and_counts_the_rest():
    from gradwatch.diagnose.advice import listed
    names = [f"fc{i}" for i in range(5)]
    assert listed(names) == "'fc0', 'fc1', 'fc2' and 2 more"
    assert listed(names[:3]) == "'fc0', 'fc1', 'fc2'"
    assert listed(range(7), 5, quote=False) == "0, 1, 2, 3, 4 and 2 more"
    assert listed([]) == ""


def test_a_remedy_continued_after_a_colon_starts_lower_case():
    from gradwatch.diagnose.advice import continued
    assert continued("Lower the learning rate tenfold (to 0.01)") == "lower the learning rate tenfold (to 0.01)"
    assert continued("") == ""


def test_statistics_count_only_up_to_the_first_non_finite_loss():
    from gradwatch.diagnose.signals import rows_before_non_finite_loss
    run = build(n_steps=60)
    assert rows_before_non_finite_loss(run) == 60
    run.loss[[42, 50]] = np.inf
    run.loss[10] = np.nan  # not recorded: no non-finite measurement
    assert rows_before_non_finite_loss(run) == 42


def test_exact_zero_gradients_in_a_tanh_net_with_no_saturation_are_not_blamed_on_relus():
    """A 1000-block tanh net whose gradient underflowed to exactly 0 was told "ReLU passes no
    gradient for negative inputs", and to use Leaky ReLU: it has no ReLU."""
    run = build(activation="tanh")
    for k in (0, 1):
        run.metrics["grad_norm"][:, run.column(f"fc{k}")] = 0.0
        run.metrics["grad_max"][sampled(run), run.column(f"fc{k}")] = 0.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    said = " ".join([*f.causes, *(r.action + r.code for r in f.remedies)])
    assert f.causes[0].startswith("depth") and "ReLU" not in said and "leaky" not in said.lower()
    relu = build(activation="relu")
    for k in (0, 1):
        relu.metrics["grad_norm"][:, relu.column(f"fc{k}")] = 0.0
        relu.metrics["grad_max"][sampled(relu), relu.column(f"fc{k}")] = 0.0
    g = next(f for f in diagnose(relu) if f.kind == "dead_units")
    assert any("ReLU passes no gradient" in c for c in g.causes)  # a ReLU net still is told so


@pytest.mark.parametrize("stds,found", [((1.27, 10.7, 216.0, 3000.0), True), ((1.0, 1.4, 2.1, 2.6), False),
                                         ((300.0, 280.0, 310.0, 290.0), False), ((1e-4, 1e-3, 1e-2, 0.1), False)])
def test_activations_growing_through_the_layers_at_the_first_step_are_the_initial_weights(stds, found):
    """A tester's SELU CNN initialised N(0, 1) under Adam: its activations' std went 1.27 -> 10.7 ->
    216 at step 0, its loss 3251, and nothing was said. Raw inputs of a large scale keep theirs
    through He-init layers (no growth), and a growth from tiny to unit scale leaves nothing pinned."""
    from gradwatch.fix.candidates import from_findings

    run = build(n_steps=100, activation="selu")
    acts = [c for c, l in enumerate(run.layers) if l.role == "activation"]
    run.metrics["act_std"][0, acts] = stds
    f = next((f for f in diagnose(run) if f.kind == "exploding_gradient"), None)
    assert (f is not None) == found
    if found:
        assert f.first_step == 0 and f.evidence["init_forward_growth"] == pytest.approx(stds[-1] / stds[0])
        assert f.causes[0].startswith("initial weight scale") and "gw.init_" in f.remedies[0].code
        assert "re-initialise per activation" in [c.name for c in from_findings([f], {"selu"})]


def test_exact_zero_gradients_of_a_recurrent_layer_are_its_saturated_gates_not_relus():
    """A tester's tanh RNN on raw sensor values (±700) got exactly zero gradient and was told to use
    Leaky ReLU, `F.leaky_relu` in place of an `F.relu` it never had: its own tanh had saturated."""
    from gradwatch.store.series import LayerInfo, RunSeries

    run = build(activation="relu")
    keep = [i for i, l in enumerate(run.layers) if l.role != "activation" and l.name in ("fc3", "fc4")]
    layers = [LayerInfo("rnn", "RNN", 0, "recurrent", 2048), *(run.layers[i] for i in keep)]  # (as the watch stores one)
    metrics = {m: np.concatenate([v[:, keep[:1]], v[:, keep]], axis=1) for m, v in run.metrics.items()}
    run = RunSeries(layers, run.steps, run.loss, run.lr, metrics, meta=run.meta)
    run.metrics["grad_norm"][:, 0] = 0.0
    run.metrics["grad_max"][np.isfinite(run.metrics["grad_max"][:, 0]), 0] = 0.0
    f = next(f for f in diagnose(run) if f.kind == "dead_units")
    said = " ".join([*f.causes, *(r.action + r.code for r in f.remedies)])
    assert f.layers == ("rnn",) and f.causes[0].startswith("saturation") and "leaky" not in said.lower()
    assert f.remedies[0].action.startswith("Standardise the inputs") and "gates are saturated" in f.message


def test_a_converged_model_fine_tuned_at_a_tiny_lr_is_no_plateau_warning():
    """A digits MLP fitted to loss ~1e-3, fine-tuned under SGD at lr 1e-5: its batch losses wander
    0.0013 -> 0.0015 on weights that barely move, and it was told to raise its learning rate. A
    loss near 0 from the start has nowhere left to go; one stuck where it started (2.3) still is a
    plateau, and a negative loss (a flow's NLL) has no floor at 0 to be near."""
    rng = np.random.default_rng(0)
    for level, plateau in ((1.3e-3, False), (2.3, True), (-1.3e-3, True)):
        run = build(n_steps=300)
        noise = rng.lognormal(0.0, 0.4, len(run.loss))  # heavy-tailed, as a fitted classifier's batches
        run.loss[:] = level * noise / np.median(noise)
        run.loss[-30:] += 0.15 * abs(level)  # ends 15% higher: within the spread, on still weights
        run.metrics["update_ratio"][sampled(run)] = 4e-8
        plateaus = [f for f in diagnose(run) if f.kind == "loss_plateau"]
        assert any(f.severity == "warning" for f in plateaus) == plateau, level
        assert plateau or [f.severity for f in plateaus] == ["info"]  # flat near 0: said, not a warning


def test_a_short_run_that_blew_up_is_diverging():
    """A tester's Hugging Face model at lr 3: 48 steps, loss 4.0 -> 496, ending at 74. Its windows
    of 5 could never rank beyond chance, and it had no finding."""
    run = build(n_steps=48)
    run.loss[:] = [4.0, 4.0, 8.2, 13.6, 44.2, 117.3, 122.6, 260.1, 235.0, 233.9, 248.1, 281.0, 273.5, 495.8, 323.5,
                   331.3, 259.2, 208.5, 157.0, 173.5, 244.6, 253.5, 188.5, 262.7, 182.2, 205.7, 189.0, 161.8, 171.0,
                   197.5, 176.0, 122.8, 186.2, 152.9, 159.5, 136.7, 118.0, 125.8, 129.0, 115.2, 110.0, 105.4, 94.3,
                   87.4, 87.5, 78.3, 83.3, 74.3]
    f = next(f for f in diagnose(run) if f.kind == "loss_divergence")
    assert f.first_step <= 5 and f.evidence["loss_max"] == 495.8


def test_a_zero_initialised_layer_under_sgd_is_read_without_numpy_warnings():
    """Its update ratio is infinite against a norm of 0: 'invalid value encountered in multiply'
    came 25 times into a tester's terminal, from the clipping check's ratio x norm."""
    import warnings

    run = build(optimizer="SGD")
    rows = sampled(run)
    run.metrics["weight_norm"][rows, run.column("fc0")] = 0.0
    run.metrics["update_ratio"][rows, run.column("fc0")] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diagnose(run)


def test_a_new_optimizers_loss_is_read_from_its_own_start():
    """A pretrained body frozen, a new 10-class head trained by an Adam of its own: its loss began
    at 5.1 against the pretraining's 0.005 and fell from there. Read against the pretraining's
    start, it was 'diverging since step 109, lower the lr from 0.05' (the pretraining SGD's)."""
    run = build(n_steps=300)
    rng = np.random.default_rng(0)
    run.loss[:100] = 0.005 + 0.001 * rng.random(100)
    run.loss[100:] = 0.8 + 4.3 * np.exp(-np.arange(200) / 20) + 0.1 * rng.random(200)
    assert "loss_divergence" in kinds(diagnose(run))  # one training: the loss leapt 1000x and stayed up
    run.meta["optimizer_stopped"] = [[100, ["fc0", "fc1", "fc2", "fc3"]]]
    assert "loss_divergence" not in kinds(diagnose(run))
    run.loss[150:] = 50.0  # the head's own loss rising after its start is still found
    (f,) = [f for f in diagnose(run) if f.kind == "loss_divergence"]
    assert f.first_step >= 100
    # a span that carries on the same objective is read from the level before it: a window of its own held
    # the blow-up (a reviewer's head at Adam lr 20 after a pretraining at 0.41: 0.41, then 446 falling to 8.8)
    run.loss[:100] = 0.41 + 0.01 * rng.random(100)
    run.loss[100] = 0.41
    run.loss[101:] = 8.8 + 437 * np.exp(-np.arange(199) / 15)
    (f,) = [f for f in diagnose(run) if f.kind == "loss_divergence"]
    assert f.first_step >= 100 and f.evidence["loss_start"] == pytest.approx(0.415, abs=0.01)
    # ... and a healthy one from a lucky first batch is not diverging (a reviewer's, 'from 0.0101')
    run.loss[100:] = 0.27 + 0.02 * np.arange(200) / 200 + 0.01 * rng.random(200)
    run.loss[:100] = 0.27 + 0.02 * rng.random(100)
    run.loss[100] = 0.0101
    assert "loss_divergence" not in kinds(diagnose(run))


def test_a_huge_first_loss_from_activations_growing_through_the_layers_is_the_inits_not_the_targets():
    """A ReLU MLP at std 0.5 (He's is 0.25 for 32 inputs): activations 1.77 -> 41.8 through 6 layers
    at the first step, a first loss of 1.8e4 on targets of std 2. Told to standardise its targets;
    re-initialised per activation it reached 0.116."""
    run = build(depth=7, optimizer="SGD", lr=0.05)
    run.loss[0] = 1.8e4
    run.metrics["update_ratio"][0, run.column("fc3")] = 880.0
    for i, std in enumerate([1.77, 3.02, 5.89, 12.8, 22.6, 41.8]):
        run.metrics["act_std"][0, run.column(f"act{i}")] = std
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.causes[0].startswith("initial weight scale") and f.remedies[0].code == "gw.init_(model)"
    assert not any(c.startswith("loss scale") for c in f.causes)
    for i in range(6):  # level activations: the loss's own scale, as before
        run.metrics["act_std"][0, run.column(f"act{i}")] = 1.0
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert f.causes[0].startswith("loss scale")


def test_a_group_held_at_lr_0_for_a_while_is_not_stalled_once_it_moves():
    """Discriminative fine-tuning: the body's group at lr 0 for 150 steps while the head warms up,
    then 1e-4 (the stored group scale is the last flush's: 0.1). Its exact-zero updates read as a
    stall 'since step 150', at 0.99x the head's per unit of lr."""
    run = build(n_steps=400, depth=4, optimizer="Adam", lr=1e-3)
    rows = sampled(run)
    u = run.metrics["update_ratio"]
    u[rows, run.column("fc3")] = 2e-3
    for name in ("fc0", "fc1", "fc2"):
        u[rows, run.column(name)] = np.where(run.steps[rows] < 150, 0.0, 2e-4)
    run.meta["lr_scale"] = {"fc0": 0.1, "fc1": 0.1, "fc2": 0.1, "fc3": 1.0}
    run.lr[run.steps < 150] = 0.0  # (the stored lr is the first group's: the body's)
    assert "stalled_layers" not in kinds(diagnose(run))
    u[rows[run.steps[rows] >= 150], run.column("fc0")] = 2e-9  # a real stall, after it moves: still found
    assert "stalled_layers" in kinds(diagnose(run))



def test_a_recurrent_layer_saturated_only_later_is_not_told_to_standardise_its_inputs():
    """A tester's GRU on standardised inputs saturated from step 30 (its targets near 5000 pushed it
    there) and its vanishing through time named 'input scale' first."""
    from gradwatch.store.series import LayerInfo, RunSeries

    base = build(n_steps=200)
    keep = [base.column("fc4")]
    layers = [LayerInfo("rnn", "GRU", 0, "recurrent", 2048, "tanh"), base.layers[keep[0]]]
    metrics = {m: np.concatenate([v[:, keep], v[:, keep]], axis=1) for m, v in base.metrics.items()}
    run = RunSeries(layers, base.steps, base.loss, base.lr, metrics, meta=base.meta)
    rows = sampled(base)
    run.time_profiles["rnn"] = (run.steps[rows], np.tile(np.logspace(-9, 0, 30), (len(rows), 1)))
    run.loss[:] = 3e7 * (1 + 0.01 * np.random.default_rng(0).random(len(run.loss)))  # a plateau: a warning
    run.metrics["saturated"][rows, 0] = np.where(run.steps[rows] >= 30, 0.95, 0.01)
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.causes[0].startswith("saturation") and not any(c.startswith("input scale") for c in f.causes)
    run.metrics["saturated"][rows, 0] = 0.95  # from the first step: the inputs' scale, first
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert any(c.startswith("input scale") for c in f.causes)


def test_a_burst_that_grew_from_the_warm_up_on_is_clipped_at_the_warm_ups_level():
    """A tester's LSTM at SGD lr 1: 0.33 at step 0, 82 at step 5, 3e7 at step 7, the burst told at
    step 10; told to clip at 9.3e7, the level read from steps 5-9, where it had already begun."""
    from gradwatch.diagnose.rules.exploding import _before_burst

    norms = np.array([0.33, 0.38, 1.25, 4.3, 9.7, 82, 744, 3.1e7, 1.6e7, 3.6e7, 1.4e7, 6.2e7, 1e9, 2e10])
    level, grown = _before_burst(norms, 10, 10, TH)
    assert grown and list(level) == list(norms[:5])
    steady = np.array([0.33, 0.38, 0.35, 0.36, 0.34, 0.37, 0.35, 0.36, 0.34, 0.35, 80.0])  # a late burst
    level, grown = _before_burst(steady, 10, 10, TH)
    assert not grown and list(level) == list(steady[5:10])


def test_an_adaptive_lr_too_high_behind_a_warm_up_from_0_still_stalls_on_long_steps():
    """A tiny BERT at AdamW 3e-2 with 10 warm-up steps from lr 0 (Hugging Face's schedules): its first
    update was 0, and its flat loss was told to raise the lr tenfold; 3e-3 learnt it."""
    run = build(n_steps=200, optimizer="AdamW", lr=3e-2)
    run.lr[:10] = np.linspace(0.0, 3e-2, 10, endpoint=False)
    rows = sampled(run)
    u = run.metrics["update_ratio"]
    u[rows[0]] = 0.0  # lr 0 at the first step: no update
    u[rows[1:]] = 0.5  # at the peak, half the weights' scale a step
    run.loss[:] = 0.69 + 0.01 * np.random.default_rng(0).random(len(run.loss))
    (f,) = [f for f in diagnose(run) if f.kind == "loss_plateau"]
    assert "first_update_ratio" in f.evidence and f.remedies[0].action.startswith("Lower the learning rate")


def test_first_activations_far_from_unit_scale_put_the_inputs_scale_first():
    """A tester's tabular MLP with numeric columns in the thousands (first activations at std 567):
    exploding and dead units were told the learning rate and clipping; standardised, its MAE halved
    and no finding was left."""
    run = build(optimizer="SGD", lr=0.1)
    run.loss[:] = 2.3 + 0.01 * np.random.default_rng(0).random(len(run.loss))
    run.metrics["update_ratio"][0, run.column("fc2")] = 5.0
    run.metrics["act_std"][0, run.column("act0")] = 567.0
    for kind in ("exploding_gradient",):
        f = next(f for f in diagnose(run) if f.kind == kind)
        assert f.causes[0].startswith("input scale: the first layer's activations have std 567")
        assert f.remedies[0].action.startswith("Standardise the inputs")
    run.metrics["act_std"][0, run.column("act0")] = 1.2  # inputs at unit scale: not said
    f = next(f for f in diagnose(run) if f.kind == "exploding_gradient")
    assert not any(c.startswith("input scale") for c in f.causes)


def test_lowest_over_highest_per_row_is_the_definition_row_by_row():
    """The vanishing and stalled rules' ratio, taken over all sampled rows at once, against its
    definition written for one row: NaN, inf, negative and zero entries, rows with one value or none."""
    from gradwatch.diagnose.signals import lowest_over_highest

    def one_row(row):
        v = row[np.isfinite(row) & (row >= 0)]
        above = v[1:][v[1:] > 0]
        return v[0] / above.max() if len(v) >= 2 and len(above) else np.nan

    rng = np.random.default_rng(0)
    values = rng.choice([0.0, -1.0, np.nan, np.inf, 1e-7, 0.3, 2.0, 5.0], size=(4000, 5))
    values[:10] = np.nan  # no value at all
    values[10:20, 1:] = np.nan  # the lowest layer's only
    expected = np.array([one_row(r) for r in values])
    got = lowest_over_highest(values)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got).any() and (got == 0).any() and np.isfinite(got).sum() > 1000
    assert np.isnan(lowest_over_highest(values[:, :1])).all() and lowest_over_highest(values[:0]).shape == (0,)


def test_a_plateau_that_fell_and_rose_back_does_not_follow_from_units_the_lr_killed():
    """The same MLP: its units died at step 70 as the lr rose past what training could take, and
    its plateau was said to follow from them ("Use Leaky ReLU": NaN by step 100 when tried); the lr
    caused both, and the plateau keeps its own advice, a lower lr (0.06 reached 0.0024)."""
    from gradwatch.diagnose import _plateau_from_block
    from gradwatch.diagnose.finding import Finding, Remedy

    lower = Remedy("Lower the learning rate tenfold (to 0.06)", "peak_lr = 0.06")
    rose = Finding("loss_plateau", "warning", 0, (), "fell, then rose back", {"loss_low": 1.05, "window_steps": 40},
                   ("learning rate: overshoots",), (lower,))
    dead = Finding("dead_units", "error", 70, ("3", "5"), "dead", {"dead_fraction": {"5": 1.0}}, ("lr",),
                   (Remedy("Use Leaky ReLU", "swap"),))
    flat = Finding("loss_plateau", "warning", 0, (), "flat", {"window_steps": 40, "loss_start": 2.3, "loss_end": 2.3},
                   ("lr small",), (lower,))
    kept, follows = _plateau_from_block([rose, dead]), _plateau_from_block([flat, dead])
    assert kept[0] is rose and kept[0].remedies[0] is lower
    assert follows[0].remedies[0].action.startswith("Use Leaky ReLU")


def test_high_sgd_momentum_is_named_with_the_lr_and_lowered_first():
    """A tester's MLP under SGD at lr 0.3, momentum 0.99, blew up and was told of the lr alone: the
    advised tenfold cut fell to 0.11 and collapsed to 2.35, where momentum 0.9 at lr 0.03 reached
    0.0027. The steps add up to lr/(1-β), 100x the lr at 0.99."""
    for momentum, named in ((0.99, True), (0.9, False)):
        run = build(n_steps=200, lr=0.3)
        run.meta["momentum"] = momentum
        run.loss[100:] = 2.3 * np.exp(np.arange(100) / 10)
        f = next(f for f in diagnose(run) if f.kind == "loss_divergence")
        assert ("momentum 0.99 (steps that add up to 100x the lr)" in f.causes[0]) == named
        assert f.remedies[0].action.startswith("Lower the momentum to 0.9") == named
        if named:
            model = torch.nn.Linear(2, 2)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.99)
            exec(f.remedies[0].code, {"optimizer": optimizer})  # noqa: S102  pasted as it is
            assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["lr"] == pytest.approx(0.03)


def test_a_vanishing_no_activation_or_depth_explains_points_between_the_layers(capsys):
    """A tester's binarised MLP (BatchNorm, then a straight-through estimator passing |x| <= 1e-3
    only) vanished with no cause given, and re-initialising made it worse. The code given finds the
    module that cuts the gradient, and runs pasted on a model with an in-place ReLU."""
    run = _vanish(build(), 0.1, rows=slice(30, None))  # 5 ReLU layers, from step 30
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.causes[0].startswith("an operation between the layers passes almost no gradient back")
    assert f.remedies[0].action.startswith("Find the module whose backward shrinks the gradient")

    class Window(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sign()

        @staticmethod
        def backward(ctx, g):
            return g * (ctx.saved_tensors[0].abs() <= 1e-3)

    class Binary(nn.Module):
        def forward(self, x):
            return Window.apply(x)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), Binary(), nn.Linear(8, 2))
    exec(f.remedies[0].code, {"model": model, "torch": torch})  # noqa: S102  pasted as it is
    model(torch.randn(3, 4)).sum().backward()
    printed = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.splitlines() if line.startswith(("2", "3")))
    assert float(printed["3"]) > 0 and float(printed["2"]) == 0  # the cut: after Binary, before it


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_post_ln_transformer_is_told_to_warm_up_not_to_add_residuals(norm_first):
    """A tester's post-LN char transformer at Adam 2e-2 without warm-up sat at the unigram loss and
    was told of its depth, to re-initialise (2.878) and to add residual connections it had; its
    30-step warm-up reached 0.17, pre-LN 0.11. Post-LN is read from the forward order: the block's
    LayerNorm runs after its attention."""
    from gradwatch.diagnose import advice

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gw.watch(model, opt, warn=False) as watch:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 5, 16)).sum().backward()
            opt.step()
        run = watch.series()
    ctx = advice.Context(run)
    assert ctx.post_ln == (not norm_first) and ctx.attention
    causes, remedies = advice.vanishing(ctx, ("0.layers.0.self_attn",), {}, through_time=False)
    assert causes[0].startswith("post-LN transformer") == (not norm_first)
    assert remedies[0].action.startswith("Warm the learning rate up") == (not norm_first)
    assert not any("add_residual" in r.code for r in remedies)
