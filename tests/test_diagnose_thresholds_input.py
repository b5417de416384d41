"""Bad thresholds are a ConfigError naming the value, at construction; a dict of them works."""

import dataclasses
import math

import pytest

import gradwatch as gw
from gradwatch.errors import ConfigError
from series_builder import build
from test_diagnose_rules import _vanish


@pytest.mark.parametrize("name, value", [("vanishing_ratio", -1.0), ("spike_factor", math.nan), ("noise_z", math.inf),
                                         ("baseline_window", 0), ("persist_samples", 2.5), ("dead_fraction", True)])
def test_a_threshold_that_is_not_a_positive_number_is_refused(name, value):
    with pytest.raises(ConfigError, match=rf"Thresholds\({name}={value!r}\): expected"):
        gw.Thresholds(**{name: value})


def test_every_default_passes_and_warm_up_may_be_zero():
    import numpy as np

    assert gw.Thresholds(vanishing_ratio=np.float32(1e-3), persist_samples=np.int64(4)).persist_samples == 4
    defaults = gw.Thresholds()
    assert all(getattr(defaults, f.name) == f.default for f in dataclasses.fields(defaults))
    assert gw.Thresholds(warmup_steps=0).warmup_steps == 0


def test_diagnose_takes_a_dict_of_thresholds_as_their_class():
    run = _vanish(build(), 0.1)  # fc0 gets 1e-4 of fc4's relative gradient
    strict = {"vanishing_ratio": 1e-2}
    lax = {"vanishing_ratio": 1e-6, "backward_vanishing_ratio": 1e-7, "vanishing_error_ratio": 1e-8}
    found = {}
    for name, given in (("strict", strict), ("lax", lax)):
        findings = gw.diagnose(run, thresholds=given)
        assert findings == gw.diagnose(run, thresholds=gw.Thresholds(**given))
        found[name] = "vanishing_gradient" in {f.kind for f in findings}
    assert found == {"strict": True, "lax": False}  # the dict's values were used
    with pytest.raises(ConfigError, match="no threshold named 'vanish_ratio'"):
        gw.diagnose(run, thresholds={"vanish_ratio": 1e-3})
    with pytest.raises(ConfigError, match="thresholds=0.01: pass gw.Thresholds"):
        gw.diagnose(run, thresholds=0.01)
