"""The backward signal's growth toward the input is read along one chain of layers: a head beside
another (an actor-critic's policy and value heads on a shared body) is no top of it. A tester's
actor-critic whose policy went deterministic (its head's gradient 4e-7) was told its backward
signal 'grows 1.1e7x toward the input'; through its body it grew 17x."""

import numpy as np

import gradwatch as gw
from series_builder import build, sampled


def _profile(grad_out: list[float]):
    """4 weight layers (fc3 the top, read from the loss) with these ∂L/∂output RMS at every sample."""
    run = build(n_steps=100, depth=4)
    rows = sampled(run)
    for name, value in zip(("fc0", "fc1", "fc2"), grad_out):
        run.metrics["grad_out_rms"][rows, run.column(name)] = value
    return run


def _backward(run):
    return [f for f in gw.diagnose(run) if f.kind == "exploding_gradient" and "backward_ratio" in f.evidence]


def test_a_head_whose_gradient_no_layer_could_multiply_to_the_one_below_is_off_the_chain():
    # fc2 (weights of norm 10, 100 of them) can multiply a gradient by 2 x 10 x 10 = 200 at most: the
    # 5e6x below it came through a sibling
    assert _backward(_profile([1.0, 0.5, 1e-7])) == []


def test_a_gradient_growing_layer_by_layer_toward_the_input_is_still_exploding():
    (f,) = _backward(_profile([1e4, 1e2, 1.0]))  # 100x per layer, within what each can do
    assert f.evidence["backward_ratio"] == 1e4
