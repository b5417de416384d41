"""The first remedy for a deep stack without normalisation: normalisation, which trained it at every
depth measured, where a new initialisation or activation stopped working past ~10 layers."""

from gradwatch.diagnose import diagnose
from gradwatch.diagnose.advice import INSERT_NORM_CODE, PLAIN_DEPTH
from series_builder import build, sampled


def _vanishing(depth: int):
    run = build(depth=depth, activation="tanh")
    for k in range(depth - 1):  # ∂L/∂s 4x smaller a layer toward the input (tanh at most 1x), from step 0
        run.metrics["grad_out_rms"][sampled(run), run.column(f"fc{k}")] *= 0.25 ** (depth - 2 - k)
    return next(f for f in diagnose(run) if f.kind == "vanishing_gradient")


def _exploding_at_init(depth: int):
    run = build(depth=depth)
    for k in range(depth - 1):  # ∂L/∂s 4x larger a layer toward the input, from step 0
        run.metrics["grad_out_rms"][sampled(run), run.column(f"fc{k}")] *= 4.0 ** (depth - 2 - k)
    return next(f for f in diagnose(run) if f.kind == "exploding_gradient")


def test_a_deep_plain_tanh_net_is_told_to_normalise_first():
    """30 tanh layers under torch's init: swapped to Leaky ReLU + He init it reached 9-23% accuracy
    on digits (SGD, momentum), with BatchNorm 80%; at 8 layers the swap still works and stays first."""
    deep = _vanishing(PLAIN_DEPTH + 2)
    assert deep.remedies[0].code == INSERT_NORM_CODE and "swap_activations" in deep.remedies[1].code
    assert sum(r.code == INSERT_NORM_CODE for r in deep.remedies) == 1
    shallow = _vanishing(8)
    assert "swap_activations" in shallow.remedies[0].code


def test_a_deep_stack_exploding_at_init_is_told_to_normalise_before_reinitialising():
    """A 40-block He-init residual MLP: each block adds its branch's variance, so the backward signal
    grows 2e8x at step 0 whatever the per-layer init; gw.init_ (the first remedy) left the loss at
    7e8 and NaN, BatchNorm trained it. A shallow net is still told to re-initialise first."""
    deep = _exploding_at_init(PLAIN_DEPTH + 6)
    assert deep.remedies[0].code == INSERT_NORM_CODE and deep.remedies[1].code.startswith("gw.init_(")
    assert any(c.startswith("depth:") for c in deep.causes)
    shallow = _exploding_at_init(8)
    assert shallow.remedies[0].code.startswith("gw.init_(")


def _dead_at_init(run, fraction: float = 0.58):
    for c in (i for i, l in enumerate(run.layers) if l.role == "activation"):
        run.metrics["dead"][sampled(run), c] = fraction
    return run


def test_relus_dead_at_init_under_a_signal_exploding_through_depth_are_its_symptom():
    """The 40-block residual MLP also had 50-58% of its ReLUs dead for the whole batch at step 0 (the
    residual sum drifts positive: one component common to every sample), and was told to
    re-initialise with He init, which it had. Without the explosion they stay a finding."""
    exploding = _dead_at_init(build(depth=PLAIN_DEPTH + 6))
    for k in range(PLAIN_DEPTH + 5):
        exploding.metrics["grad_out_rms"][sampled(exploding), exploding.column(f"fc{k}")] *= 4.0 ** (PLAIN_DEPTH + 4 - k)
    found = [f.kind for f in diagnose(exploding)]
    assert "exploding_gradient" in found and "dead_units" not in found
    assert "dead_units" in [f.kind for f in diagnose(_dead_at_init(build(depth=PLAIN_DEPTH + 6)))]
