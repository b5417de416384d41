"""An lr ceiling for a loop that updates its weights by hand (p -= lr·g, an lr raised each step until
the run blew up): its lr is read from the updates it made, and the trial's cap trains as the printed
`lr = min(lr, cap)` does."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.collect import auto
from gradwatch.diagnose.advice import Context
from gradwatch.fix.candidates import lr_cap, updates_lr
from gradwatch.fix.inject import Injector
from gradwatch.fix.names import read_names
from gradwatch.store import read_run

LOOP = """
lr = 0.01 * 1.05 ** step
with torch.no_grad():
    for p in model.parameters():
        p -= lr * p.grad
"""


def by_hand(steps: int, cap: float | None = None, injector: Injector | None = None,
            evaluate: bool = False, momentum: float = 0.0, saved: list | None = None,
            clip: float | None = None) -> list[float]:
    """A 3-layer net trained by hand at an lr 5% higher each step (`cap`: the printed ceiling;
    `evaluate`: a forward without gradients between each backward and its update; `momentum` by
    hand; `saved`: gets the state_dict after the last update)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    w, losses, velocity = torch.randn(8, 1), [], {}
    if injector is not None:
        injector.install_late()
    try:
        for step in range(steps):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
            loss = nn.functional.mse_loss(model(x), x @ w)
            model.zero_grad()
            loss.backward()
            if evaluate:
                with torch.no_grad():
                    model(x)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            lr = 0.01 * 1.05 ** step
            if cap is not None:
                lr = min(lr, cap)
            with torch.no_grad():
                for p in model.parameters():
                    if momentum:
                        velocity[p] = momentum * velocity.get(p, 0) + p.grad
                    p -= lr * (velocity[p] if momentum else p.grad)
            losses.append(loss.item())
        if saved is not None:
            saved.append({k: v.clone() for k, v in model.state_dict().items()})
    finally:
        if injector is not None:
            injector.remove()
    return losses


def watched_by_hand(run_dir, steps: int = 12):
    """The loop of `by_hand` under the zero-code watch, every step sampled: its store."""
    run_dir.mkdir()
    watch = auto.AutoWatch(str(run_dir), warn=False, sample_every=1)
    try:
        by_hand(steps)
    finally:
        watch.detach()
    return read_run(run_dir)


def test_the_lr_of_a_loop_by_hand_is_read_from_its_updates(tmp_path):
    run = watched_by_hand(tmp_path / "run")
    lrs = updates_lr(run)
    measured = np.isfinite(lrs)
    assert run.meta.get("optimizer") is None and measured.sum() >= 6
    np.testing.assert_allclose(lrs[measured], 0.01 * 1.05 ** run.steps[measured], rtol=1e-3)


@pytest.mark.parametrize("evaluate, clip", [(False, None), (True, None), (False, 0.5)],
                         ids=["plain", "an evaluation between", "clipped by hand"])
def test_the_trials_cap_on_a_loop_by_hand_trains_as_the_printed_ceiling(evaluate, clip):
    """Clipped by hand between the backward and the update: the update is read against the
    gradients it applied (read against the backward's, it was lr times the clip factor)."""
    cap = 0.02  # reached at step 15 of 40
    trial = by_hand(40, injector=Injector(lr_cap(cap).spec, max_steps=None), evaluate=evaluate, clip=clip)
    printed = by_hand(40, cap=cap, clip=clip)
    uncapped = by_hand(40)
    np.testing.assert_allclose(trial, printed, rtol=1e-4)
    if clip is None:
        assert trial[:16] == uncapped[:16] and not np.allclose(trial[20:], uncapped[20:], rtol=1e-3)


def test_a_loop_by_hand_is_printed_the_ceiling_on_its_own_lr(tmp_path):
    names = replace(read_names("import torch\nfor step in range(10):\n    loss.backward()\n" + LOOP),
                    run=Context(watched_by_hand(tmp_path / "run", steps=4)))
    assert names.manual
    assert lr_cap(0.0265, names).code.startswith("lr = min(lr, 0.0265)  # every step, right before your update, after lr is set")


def test_the_last_update_is_capped_before_a_checkpoint_of_it():
    """No forward after the last update: the state_dict the script saves holds the capped weights."""
    trial, printed = [], []
    by_hand(30, injector=Injector(lr_cap(0.02).spec, max_steps=None), saved=trial)
    by_hand(30, cap=0.02, saved=printed)
    assert all(torch.allclose(trial[0][k], printed[0][k], rtol=1e-5, atol=1e-7) for k in printed[0])


def test_momentum_by_hand_is_no_lr_to_read_nor_to_cap(tmp_path):
    """|dw|/|g| with momentum grows from the lr at a constant lr (a false schedule), and the cap's
    scaling of such an update trained nothing like the printed line: neither is done."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    watch = auto.AutoWatch(str(run_dir), warn=False, sample_every=1)
    try:
        by_hand(12, momentum=0.9)
    finally:
        watch.detach()
    assert not np.isfinite(updates_lr(read_run(run_dir))[1:]).any()
    capped = by_hand(30, injector=Injector(lr_cap(0.02).spec, max_steps=None), momentum=0.9)
    assert capped == by_hand(30, momentum=0.9)


def test_a_half_precision_loop_by_hand_is_capped_despite_its_rounding():
    """bf16's p - lr·g rounds to half an ulp: read as no plain gradient step, it went uncapped."""
    def bf16(steps: int, cap: float | None = None, injector: Injector | None = None) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
        w, losses = torch.randn(8, 1, dtype=torch.bfloat16), []
        if injector is not None:
            injector.install_late()
        try:
            for step in range(steps):
                x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
                loss = nn.functional.mse_loss(model(x), x @ w)
                model.zero_grad()
                loss.backward()
                lr = min(0.01 * 1.05 ** step, cap or float("inf"))
                with torch.no_grad():
                    for p in model.parameters():
                        p -= lr * p.grad
                losses.append(loss.item())
        finally:
            if injector is not None:
                injector.remove()
        return losses
    trial = bf16(40, injector=Injector(lr_cap(0.02).spec, max_steps=None))
    assert trial != bf16(40)
    np.testing.assert_allclose(trial, bf16(40, cap=0.02), rtol=0.1)


def test_a_deep_copy_of_the_model_takes_no_cap_with_it():
    """An EMA or teacher copy made by deepcopy: the hook's method copied the whole injector, whose
    pending cap then rewrote the copy's weights at its own forward."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    injector = Injector(lr_cap(0.001).spec, max_steps=None)
    injector.install_late()
    try:
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        ema = copy.deepcopy(model)
        before = [p.clone() for p in ema.parameters()]
        ema(torch.randn(2, 4))
        assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters()))
    finally:
        injector.remove()
