"""The total gradient norm (a sum over every layer at every step: 0.9 s at 50k steps x 480 layers)
is summed once per diagnosis however many rules read it, and afresh in the next one."""

import numpy as np

import gradwatch as gw
from gradwatch.diagnose import signals
from series_builder import build


def test_the_total_norm_is_summed_once_per_diagnosis_and_afresh_after(monkeypatch):
    calls = []
    summed = signals._summed_norms
    monkeypatch.setattr(signals, "_summed_norms", lambda run, stepped_only: calls.append(stepped_only) or summed(run, stepped_only))
    run = build(n_steps=200, optimizer="SGD")
    run.meta["grad_clip"] = "total norm to 0.5"  # clipping on every step: three reads of the norm
    first = gw.diagnose(run)
    assert calls == [True]
    run.metrics["grad_norm"][150:] *= 1e4  # changed after: the next diagnosis sees it
    assert "exploding_gradient" in [f.kind for f in gw.diagnose(run)] and calls == [True, True]
    assert "exploding_gradient" not in [f.kind for f in first]
    assert signals._KEPT not in run.__dict__
    assert np.array_equal(signals.total_grad_norm(run, stepped_only=True), summed(run, True))
