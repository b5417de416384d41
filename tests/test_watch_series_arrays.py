"""`watch.series()` gives numpy arrays, as the README shows, while the live rules read the store
compactly: a `RecordedRows` in their place broke `.max()`, `.T`, `torch.from_numpy`."""

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.store import read_run


def test_series_metrics_are_read_only_numpy_arrays_equal_to_the_stored_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", warn=False) as watch:
        for _ in range(30):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
        series = watch.series()
        assert watch.findings() == gw.diagnose(series)  # the rules read the same numbers either way
    stored = read_run(tmp_path / "run")
    for m, values in series.metrics.items():
        assert type(values) is np.ndarray and values.dtype == np.float64 and not values.flags.writeable
        np.testing.assert_array_equal(values, stored.metrics[m])
    g = series.metrics["grad_norm"]
    assert np.nanmax(g) == np.nanmax(np.asarray(stored.metrics["grad_norm"])) and g.T.shape == g.shape[::-1]
