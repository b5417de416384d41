"""A training resumed from a checkpoint (`gradwatch run` stores meta `resumed`): its first recorded
step has trained weights, so a finding there is not "at initialisation" nor the initial weights'."""

import numpy as np

from gradwatch.diagnose import diagnose
from series_builder import build


def _growing_toward_the_input(resumed: bool):
    run = build()
    for k in range(4):
        run.metrics["grad_out_rms"][:, run.column(f"fc{k}")] *= 20.0 ** (3 - k)  # 8000x from the first step
    if resumed:
        run.meta["resumed"] = {"at_step": 40, "optimizer": "Adam"}
        run.steps = run.steps + 40
    return next(f for f in diagnose(run) if f.kind == "exploding_gradient")


def _vanishing_from_the_first_step(resumed: bool):
    run = build(activation="sigmoid")
    for k in range(4):
        run.metrics["grad_out_rms"][:, run.column(f"fc{k}")] *= 1e-2 ** (3 - k)
    if resumed:
        run.meta["resumed"] = {"at_step": None, "optimizer": "SGD"}  # SGD keeps no count: numbered from 0
    return next(f for f in diagnose(run) if f.kind == "vanishing_gradient")


def test_a_resumed_run_is_not_read_as_at_initialisation():
    fresh, resumed = _growing_toward_the_input(False), _growing_toward_the_input(True)
    assert fresh.evidence["at_init"] and "init_backward_ratio" in fresh.evidence
    assert not resumed.evidence["at_init"] and "init_backward_ratio" not in resumed.evidence
    assert any(c.startswith("initial weight") for c in fresh.causes)
    assert not any(c.startswith("initial weight") for c in resumed.causes) and resumed.first_step == 40
    fresh, resumed = _vanishing_from_the_first_step(False), _vanishing_from_the_first_step(True)
    assert fresh.evidence["at_init"] and not resumed.evidence["at_init"]
    assert np.isclose(fresh.evidence["backward_ratio"], resumed.evidence["backward_ratio"])  # the same measure
