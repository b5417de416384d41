"""A regression loss whose target broadcasts against the prediction ((B, 1) against (B,): a (B, B)
grid) trains every prediction toward the targets' mean. A tester's 1D CNN was told its gradient
vanished from a bad initialisation; torch's own warning named the shapes. The watch reads it."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnose import diagnose


def _train(broadcast: bool, watched: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    y = x[:, 0] * 2 + 0.1 * torch.randn(64)
    watch = gw.watch(model, opt, warn=False) if watched else None
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # (shown once per place, as outside a test)
        for _ in range(60):
            pred = model(x)
            loss = F.mse_loss(pred if broadcast else pred.view_as(y), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = watch.series() if watch else None
    if watch:
        watch.detach()
    return run, loss.item(), [p.detach().clone() for p in model.parameters()]


def test_a_target_that_broadcasts_into_a_grid_is_an_error_with_the_shapes_and_the_line():
    run, loss, weights = _train(broadcast=True)
    f = next(f for f in diagnose(run) if f.kind == "loss_broadcast")
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "if broadcast else" in text)
    assert f.severity == "error" and f.evidence["where"] == f"test_loss_broadcast.py:{line}"
    assert f.evidence["broadcast_shape"] == [64, 64] and "every prediction against every target" in f.message
    assert f.remedies[0].code.startswith("pred = pred.view_as(y)  # (64, 1) -> (64,)")
    _, unwatched, same = _train(broadcast=True, watched=False)
    assert loss == unwatched and all(torch.equal(a, b) for a, b in zip(weights, same))  # nothing changed


def test_matching_shapes_are_no_finding():
    run, _, _ = _train(broadcast=False)
    assert not [f for f in diagnose(run) if f.kind == "loss_broadcast"]


def test_an_nn_loss_module_is_placed_at_the_scripts_line_and_a_squeezed_batch_of_one_is_none():
    """nn.MSELoss's warning names torch's loss.py: the watch reads the script's own line. A
    prediction squeezed to () against a target (1,) (a last batch of one) is the same loss."""
    from gradwatch.diagnose.rules.loss_broadcast import find_loss_broadcast
    from gradwatch.diagnose.thresholds import Thresholds

    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 1), nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, warn=False) as watch, warnings.catch_warnings():
        warnings.simplefilter("default")
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(torch.randn(8, 3)), torch.randn(8)).backward()  # (8, 1) against (8,)
            opt.step()
        run = watch.series()
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "(8, 1) against (8,)" in text)
    (f,) = [f for f in diagnose(run) if f.kind == "loss_broadcast"]
    assert f.evidence["where"] == f"test_loss_broadcast.py:{line}"
    run.meta["loss_broadcast"] = [[0, {"where": "t.py:1", "input": [], "target": [1]}]]
    assert find_loss_broadcast(run, Thresholds()) == []


def test_the_scripts_warnings_are_shown_as_often_as_without_a_watch(tmp_path):
    """A warning shown once per line (Python's default) was shown again at every live check: a rule's
    `warnings.catch_warnings()` reset the record of warnings shown, 4-5 times in a tester's run."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import warnings, torch\nfrom torch import nn\nimport gradwatch as gw\n"
        "torch.manual_seed(0)\nmodel = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
        "watch = gw.watch(model, opt, flush_every=10)\n"
        "for step in range(300):\n"
        "    warnings.warn('mine: once per line')\n"
        "    opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()\n"
        "watch.detach()\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("UserWarning: mine") == 1, result.stderr
    assert "RuntimeWarning" not in result.stderr  # (nor numpy's, from the checks)
