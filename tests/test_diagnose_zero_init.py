"""Weights that start all zero are one cause, however the run shows them: dead units under ReLU or
tanh (exact zeros pass down), a vanishing gradient under sigmoid (its units all give 0.5)."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from series_builder import build, sampled


def _sigmoid_vanishing(zero_layers=()):
    """A sigmoid MLP whose ∂L/∂s collapses 3e-5 toward the input from the first sample; the named
    layers start with weight norm 0."""
    run = build(activation="sigmoid")
    for k in range(4):
        run.metrics["grad_out_rms"][sampled(run), run.column(f"fc{k}")] *= 10.0 ** (-1.5 * (3 - k))
    for name in zero_layers:
        _zero_at_start(run, name, blocking=True)
    return next(f for f in diagnose(run) if f.kind == "vanishing_gradient")


def _zero_at_start(run, name: str, blocking: bool) -> None:
    """`name` starts all zero; blocking: W^T δ = 0 reaches every layer below at the first step (no
    skip around it), so their ∂L/∂s is exactly 0 there."""
    run.metrics["weight_norm"][0, run.column(name)] = 0.0
    if blocking:
        run.metrics["grad_out_rms"][0, :run.column(name)] = 0.0


def test_a_vanishing_gradient_below_all_zero_weights_names_them_first():
    """A 4-layer sigmoid MLP whose second layer started all zero: nothing passes below it at step 0,
    and the vanishing gradient it caused was blamed on the sigmoids (swap to Leaky ReLU)."""
    f = _sigmoid_vanishing(["fc1"])
    assert f.evidence["zero_weight_layers"] == ["fc1"]
    assert f.causes[0].startswith("initial weights: 'fc1' start with all parameters exactly 0")
    assert "instead of zeros" in f.remedies[0].action and f.remedies[0].code.startswith("gw.init_(model")
    plain = _sigmoid_vanishing()  # no zero weights: the sigmoids as before
    assert "zero_weight_layers" not in plain.evidence and plain.causes[0].startswith("saturating activation")
    assert not _sigmoid_vanishing(["fc4"]).causes[0].startswith("initial weights")  # a zero output layer: by design


def _zero_middle(act: type[nn.Module]):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))
    nn.init.zeros_(model[2].weight), nn.init.zeros_(model[2].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    with gw.watch(model, opt, warn=False) as watch:
        for i in range(60):
            xb, yb = x[i % 4 * 64:(i % 4 + 1) * 64], y[i % 4 * 64:(i % 4 + 1) * 64]
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(), loss.backward(), opt.step()
        return watch.findings()


def test_a_zero_middle_layer_reads_the_same_under_relu_and_sigmoid():
    """The same zero-initialised layer, two activations: dead units under ReLU, a vanishing gradient
    under sigmoid; both say the zero weights and re-initialisation first, nothing else first."""
    firsts = []
    for act in (nn.ReLU, nn.Sigmoid):
        harmful = [f for f in _zero_middle(act) if f.kind not in ("loss_plateau",) and f.severity != "info"]
        assert harmful, act
        firsts.append({(f.causes[0], f.remedies[0].action) for f in harmful})
    assert firsts[0] == firsts[1] and len(firsts[0]) == 1
    cause, _ = next(iter(firsts[0]))
    assert cause.startswith("initial weights: '2' start with all parameters exactly 0")


def test_gates_that_start_at_zero_on_purpose_are_not_zero_weights():
    """A ReZero block's gate (one number) and a residual branch's last BatchNorm gain (torchvision's
    zero_init_residual) start at 0 by design, beside a skip: a 12-block ReZero MLP listed its 12
    gates as 'initial weights ... exactly 0', the cause any finding at its first step would name."""
    from gradwatch.diagnose.signals import zero_initialised
    from gradwatch.store.series import LayerInfo, RunSeries
    run = build()
    layers = [*run.layers, LayerInfo("blk.alpha", "Block", 2, "param", 1), LayerInfo("blk.bn", "BatchNorm1d", 4, "param", 200)]
    metrics = {m: np.concatenate([v, np.full((len(run.steps), 2), np.nan)], axis=1) for m, v in run.metrics.items()}
    metrics["weight_norm"][sampled(run), -2:] = 0.0
    gated = RunSeries(layers, run.steps, run.loss, run.lr, metrics, meta=run.meta)
    assert zero_initialised(gated) == []
    _zero_at_start(gated, "fc1", blocking=True)
    assert zero_initialised(gated) == ["fc1"]


def test_a_zero_layer_beside_a_skip_is_not_the_cause():
    """An adapter's `up` (LoRA's B, a ControlNet zero conv) starts at 0 beside a skip that carries the
    gradient on: a 12-layer sigmoid MLP's 3.5e-10 vanishing gradient was blamed on it, with
    're-initialise instead of zeros' first, the same ratio as without the adapter."""
    run = build(activation="sigmoid")
    for k in range(4):
        run.metrics["grad_out_rms"][sampled(run), run.column(f"fc{k}")] *= 10.0 ** (-1.5 * (3 - k))
    _zero_at_start(run, "fc2", blocking=False)
    run.metrics["grad_out_rms"][0, run.column("fc1")] = 0.0  # the adapter's own `down`, on the branch
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert "zero_weight_layers" not in f.evidence and f.causes[0].startswith("saturating activation")
    run.metrics["grad_out_rms"][0, run.column("fc0")] = 0.0  # no skip: everything below got 0
    f = next(f for f in diagnose(run) if f.kind == "vanishing_gradient")
    assert f.evidence["zero_weight_layers"] == ["fc2"]


def test_a_zero_lowest_layer_counts_only_when_its_own_gradient_is_zero():
    from gradwatch.diagnose.signals import zero_initialised
    run = build()
    run.metrics["weight_norm"][0, run.column("fc0")] = 0.0
    assert zero_initialised(run) == []  # δ x^T reaches it: it learns
    run.metrics["grad_norm"][0, run.column("fc0")] = 0.0
    assert zero_initialised(run) == ["fc0"]
    run.metrics["grad_norm"][0, run.column("fc0")] = np.nan  # not recorded: read as before
    assert zero_initialised(run) == ["fc0"]
