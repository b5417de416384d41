"""An optimizer step fused into backward (torch's tutorial: a post-accumulate-grad hook per parameter
steps and clears `p.grad`): a watch attached after those hooks finds no gradient left in its own.
It crashed the training's first backward (AttributeError from inside the watch)."""

import torch
from torch import nn

import gradwatch


def _train(watch_at: str | None, steps: int = 4):
    """`watch_at`: attach the watch "before" or "after" the fused optimizer's hooks (None: unwatched)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
    seen = []

    def fused(p):
        seen.append(torch.linalg.vector_norm(p.grad).item())
        opts[p].step()
        opts[p].zero_grad()

    watch = gradwatch.watch(model, warn=False, status=False) if watch_at == "before" else None
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(fused)
    if watch_at == "after":
        watch = gradwatch.watch(model, warn=False, status=False)
    x = torch.randn(16, 8)
    losses = []
    for _ in range(steps):
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.item())
    run = watch.series() if watch else None
    if watch:
        watch.detach()
    return losses, [p.detach().clone() for p in model.parameters()], run, seen


def test_a_watch_after_a_fused_optimizer_leaves_the_training_as_it_was():
    plain = _train(None)
    for at in ("after", "before"):
        losses, weights, run, _ = _train(at)
        assert losses == plain[0]
        assert all(torch.equal(a, b) for a, b in zip(weights, plain[1]))
        assert list(run.steps) == [0, 1, 2, 3]


def test_a_watch_before_the_fused_optimizer_reads_each_gradient():
    _, _, run, seen = _train("before", steps=2)
    # per step, the 4 tensors' norms as the fused hook saw them: weight, bias of layer 0, then layer 2
    for step in range(2):
        norms = seen[4 * step: 4 * step + 4]
        by_layer = {name: [] for name in ("0", "2")}
        # backward reaches layer 2 first: its two tensors' norms come first
        by_layer["2"], by_layer["0"] = norms[:2], norms[2:]
        for name, pair in by_layer.items():
            want = (pair[0] ** 2 + pair[1] ** 2) ** 0.5
            assert abs(run.metrics["grad_norm"][step, run.column(name)] - want) <= 1e-6 * want


def test_a_watch_after_the_fused_optimizer_says_once_that_it_records_no_gradient(capsys):
    """Recording nothing for those gradients, silently, read as a healthy run with no gradients."""
    _train("after")
    said = [line for line in capsys.readouterr().err.splitlines() if "cleared p.grad" in line]
    assert len(said) == 1 and "call gw.watch(model, optimizer) in the script before" in said[0]
    _train("before")
    assert "cleared p.grad" not in capsys.readouterr().err
