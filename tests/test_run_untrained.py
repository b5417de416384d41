"""Zero-code watching of a process whose backward passes train nothing (no optimizer, no weight
changed): saliency maps, input gradients, an evaluation that calls backward."""

import torch
from torch import nn

from gradwatch.collect.auto import AutoWatch
from gradwatch.store import read_run


def _backwards(tmp_path, n, lr=0.0, **options):
    """`n` backward passes through a small MLP, its weights moved by hand by `lr` after each; the
    watch's store directory and the losses the loop computed."""
    tmp_path.mkdir(exist_ok=True)  # (made by `gradwatch run`)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    watch = AutoWatch(str(tmp_path), warn=False, **options)
    losses = []
    try:
        for _ in range(n):
            x = torch.randn(4, 6, requires_grad=True)
            loss = model(x).max(1).values.sum()
            model.zero_grad()
            loss.backward()
            losses.append(loss.item())
            if lr:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= lr * p.grad
    finally:
        watch.detach()
    return losses


def test_backwards_that_change_no_weight_are_not_recorded_as_stalled_training(tmp_path, capsys):
    """20 saliency backwards were one step whose weights "stopped changing at step 0": an error
    finding, stalled_layers, and the advice to give the optimizer every parameter. Past 64
    backwards (the accumulation wait) and a flush, every backward was a stalled step."""
    for n in (20, 150):
        out = tmp_path / str(n)
        _backwards(out, n, flush_every=20)
        assert list(out.glob("gradwatch*.sqlite")) == []
        assert "no optimizer step and no weight changed: this process trained nothing" in capsys.readouterr().err


def test_weights_updated_by_hand_are_still_recorded_from_the_first_step(tmp_path, capsys):
    losses = _backwards(tmp_path, 30, lr=0.01, flush_every=20)
    run = read_run(tmp_path)
    assert list(run.steps) == list(range(30))
    assert list(run.loss) == [torch.tensor(v).float().item() for v in losses]
    assert (run.metrics["update_ratio"][::10, 0] > 0).all()
    assert "trained nothing" not in capsys.readouterr().err
