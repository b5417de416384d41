"""An optimizer step fused into backward (torch's tutorial: a post-accumulate-grad hook per parameter
steps and clears `p.grad`): a watch attached after those hooks finds no gradient left in its own.
It crashed the training's first backward (AttributeError from inside the watch)."""

import numpy as np
import torch
from torch import nn

import gradwatch


def float64_weights(layer: nn.Module) -> list[torch.Tensor]:
    """The layer's weights before a step, in float64 (the reference's own recount)."""
    return [p.detach().double().clone() for p in layer.parameters()]


def update_ratio(layer: nn.Module, before: list[torch.Tensor]) -> float:
    """|Δw| / |w| of the layer's step from `before`, in float64."""
    change = torch.cat([(p.detach().double() - b).flatten() for p, b in zip(layer.parameters(), before)])
    return (change.norm() / torch.cat([b.flatten() for b in before]).norm()).item()


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


def test_a_watch_before_the_fused_optimizer_reads_each_update():
    """Its weights change inside backward: taken after it, they never changed before the next one,
    every update ratio read 0 and diagnose said `stalled_layers` (an error) of a training that
    learns. Each sampled step's ratio is the float64 recount of the change across its backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opts = {p: torch.optim.Adam([p], lr=0.01) for p in model.parameters()}
    watch = gradwatch.watch(model, sample_every=2, warn=False, status=False)

    def fused(p):
        opts[p].step()
        opts[p].zero_grad()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(fused)
    x, want = torch.randn(16, 8), {"0": [], "2": []}
    for _ in range(6):
        before = {name: [p.detach().double().clone() for p in model[int(name)].parameters()] for name in want}
        model(x).square().mean().backward()
        for name, old in before.items():
            new = [p.detach().double() for p in model[int(name)].parameters()]
            change = torch.cat([(b - a).flatten() for a, b in zip(old, new)]).norm()
            want[name].append((change / torch.cat([a.flatten() for a in old]).norm()).item())
    run = watch.series()
    watch.detach()
    for name, ratios in want.items():
        steps, stored = run.series(name, "update_ratio")
        assert list(steps) == [0, 2, 4]
        np.testing.assert_allclose(stored, ratios[::2], rtol=1e-5)
    assert "stalled_layers" not in {f.kind for f in gradwatch.diagnose(run)}


def test_zero_code_reads_a_fused_optimizers_gradients_and_updates(tmp_path, capsys):
    """`gradwatch run` of the recipe: the script's hooks come before the watch's (its model is
    found at its first forward), and the per-parameter optimizers step inside backward. The first
    one was adopted as the step's optimizer and ended each step inside the backward: no gradient,
    no loss stored. Each backward is a step, its gradients read before the fused step clears them
    (the norms the fused hook saw) and its update across the backward (float64 recount)."""
    from gradwatch.collect.auto import AutoWatch
    from gradwatch.store import read_run

    def train(watched: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        opts = {p: torch.optim.Adam([p], lr=0.01) for p in model.parameters()}
        watch = AutoWatch(str(tmp_path), sample_every=2) if watched else None
        seen, ratios = [], []

        def fused(p):
            seen.append(p.grad.double().square().sum().item())
            opts[p].step()
            opts[p].zero_grad()
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(fused)
        x, losses = torch.randn(16, 8), []
        for _ in range(5):
            before = float64_weights(model[0])
            loss = model(x).square().mean()
            loss.backward()
            losses.append(loss.item())
            ratios.append(update_ratio(model[0], before))
        if watch:
            watch.detach()
        return losses, [p.detach().clone() for p in model.parameters()], seen, ratios

    plain = train(False)
    losses, weights, seen, ratios = train(True)
    assert losses == plain[0] and all(torch.equal(a, b) for a, b in zip(weights, plain[1]))
    run = read_run(tmp_path)
    np.testing.assert_array_equal(run.loss, np.array(losses))
    # per step, backward reaches layer 2's weight and bias, then layer 0's
    norms = np.sqrt(np.array(seen).reshape(5, 4)[:, 2:].sum(axis=1))
    np.testing.assert_allclose(run.series("0", "grad_norm")[1], norms, rtol=1e-5)
    steps, stored = run.series("0", "update_ratio")
    assert list(steps) == [2, 4]  # (step 0's update had begun when the watch saw it was fused)
    np.testing.assert_allclose(stored, [ratios[2], ratios[4]], rtol=1e-5)
    assert "cleared p.grad" not in capsys.readouterr().err


def test_zero_code_reads_an_optimizer_in_backward_beside_one_after_it(tmp_path, capsys):
    """Layer 0 updated by per-parameter optimizers inside backward, layer 2 by one after it (the
    step's). Those in backward were taken for another optimizer stepping: layer 0's gradients
    read 0, no update ratio, and the cleared gradients' warning was not given either. Its
    gradients are read before their step clears them (float64 recount), its updates measured."""
    from gradwatch.collect.auto import AutoWatch
    from gradwatch.store import read_run

    def train(watched: bool, steps: int = 8):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        opts = {p: torch.optim.SGD([p], lr=0.05) for p in model[0].parameters()}
        seen = {}

        def fused(p):
            seen[id(p)] = p.grad.double().square().sum().item()
            opts[p].step()
            opts[p].zero_grad()
        watch = AutoWatch(str(tmp_path), sample_every=2) if watched else None
        for p in model[0].parameters():
            p.register_post_accumulate_grad_hook(fused)
        after = torch.optim.SGD(model[2].parameters(), lr=0.05)
        losses, norms, ratios = [], [], []
        for _ in range(steps):
            x = torch.randn(32, 4)
            before = float64_weights(model[0])
            loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
            after.zero_grad()
            loss.backward()
            after.step()
            losses.append(loss.item())
            norms.append(sum(seen[id(p)] for p in model[0].parameters()) ** 0.5)
            ratios.append(update_ratio(model[0], before))
        if watch:
            watch.detach()
        return losses, [p.detach().clone() for p in model.parameters()], norms, ratios

    plain = train(False)
    losses, weights, norms, ratios = train(True)
    assert losses == plain[0] and all(torch.equal(a, b) for a, b in zip(weights, plain[1]))
    run = read_run(tmp_path)
    np.testing.assert_array_equal(run.loss, np.array(losses))
    steps, stored = run.series("0", "grad_norm")
    np.testing.assert_allclose(stored, norms, rtol=1e-5)
    index = {step: k for k, step in enumerate(steps)}  # (step numbers: the first one's adoption skips one)
    sampled, stored = run.series("0", "update_ratio")
    assert len(sampled) >= 3
    np.testing.assert_allclose(stored, [ratios[index[step]] for step in sampled], rtol=1e-5)
    assert "cleared p.grad" not in capsys.readouterr().err
