"""Zero-code watching of a training resumed from a checkpoint: its steps go on from the count its
loaded optimizer state keeps, so two runs of one training line up."""

import copy
import io

import numpy as np
import torch
from torch import nn

from gradwatch.cli.summary import print_run_summary
from gradwatch.collect.auto import AutoWatch
from gradwatch.store import read_run


def _train(out, steps, make_opt, state=None, late_head=False, **options):
    """`steps` steps of a small regression, from a checkpoint `state` if given, watched into `out`
    (None: not watched); returns the losses the loop computed and the checkpoint at the end."""
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), nn.Linear(4, 1)
    watch = None
    if out is not None:
        out.mkdir()  # (made by `gradwatch run`)
        watch = AutoWatch(str(out), warn=False, number_resumed=True, **options)
    opt = make_opt([*body.parameters(), *head.parameters()])
    if state is not None:
        state = copy.deepcopy(state)  # (a loaded optimizer state's tensors are the checkpoint's: updated in place)
        body.load_state_dict(state["body"]), head.load_state_dict(state["head"]), opt.load_state_dict(state["opt"])
    gen = torch.Generator().manual_seed(1 if state is None else 2)
    losses = []
    try:
        for i in range(steps):
            x = torch.randn(16, 6, generator=gen)
            y = body(x)
            y = head(y) if i or not late_head else y[:, :1]  # (the head joins at the second step)
            loss = (y - x[:, :1]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        if watch is not None:
            watch.detach()
    return losses, {"body": body.state_dict(), "head": head.state_dict(), "opt": opt.state_dict()}


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def sgd(params):
    return torch.optim.SGD(params, lr=1e-2)  # (plain: its checkpoint holds no state at all)


def test_a_resumed_training_is_numbered_from_its_optimizers_step_count(tmp_path):
    """A resumed training's steps were numbered from 0 again: its run could not be lined up with
    the first, and a finding's "since step N" was not the training's step N."""
    _, checkpoint = _train(tmp_path / "first", 12, adam, flush_every=5)
    first = read_run(tmp_path / "first")
    losses, end = _train(tmp_path / "again", 12, adam, state=checkpoint, flush_every=5)
    again = read_run(tmp_path / "again")
    taken = len(first.steps)  # the reference: the steps the first run took
    assert list(again.steps) == list(range(taken, taken + 12))
    assert again.meta["resumed"] == {"at_step": taken, "optimizer": "Adam"}
    assert list(again.loss) == [np.float32(v) for v in losses]  # the recorded values, as before
    sampled = again.steps[~np.isnan(again.metrics["update_ratio"][:, 0])]
    assert list(sampled) == [12, 20]  # the first step, then steps counted as the first run counts them
    # watching changed nothing: the same losses and weights as the resumed training unwatched
    plain_losses, plain_end = _train(None, 12, adam, state=checkpoint)
    assert losses == plain_losses
    assert all(torch.equal(end["body"][k], plain_end["body"][k]) for k in end["body"])
    out = io.StringIO()
    print_run_summary(tmp_path / "again", out)
    assert f"resumed from a checkpoint: its steps are numbered from {taken}, the steps Adam's" in out.getvalue()


def test_a_resumed_training_finds_its_models_as_a_fresh_one_does(tmp_path):
    """The models are looked for over the first steps: counted from the resumed step, not from 0
    (a model first called at the second step was found in a fresh training only)."""
    _, checkpoint = _train(None, 3, adam)
    _train(tmp_path / "r", 4, adam, state=checkpoint, late_head=True)
    run = read_run(tmp_path / "r")
    assert run.steps[0] == 3 and "head" in [l.name for l in run.layers]


def test_an_optimizer_that_counts_no_steps_leaves_them_numbered_from_0_and_says_so(tmp_path):
    _, checkpoint = _train(tmp_path / "first", 5, sgd)
    assert "resumed" not in read_run(tmp_path / "first").meta  # a fresh training: nothing said
    _train(tmp_path / "again", 5, sgd, state=checkpoint)
    again = read_run(tmp_path / "again")
    assert list(again.steps) == list(range(5))
    assert again.meta["resumed"] == {"at_step": None, "optimizer": "SGD"}
    out = io.StringIO()
    print_run_summary(tmp_path / "again", out)
    assert "SGD's loaded state keeps no step count: its steps are numbered from 0 here" in out.getvalue()


def test_an_optimizer_given_back_its_own_state_by_accelerate_has_resumed_nothing(tmp_path):
    """Accelerate's `prepare` loads an optimizer's own state back to move it to the device: a fresh
    training was said to be resumed from a checkpoint. (A plain SGD's real checkpoint, empty as
    this one, still is: above.)"""
    import sys
    import types

    accelerate = types.ModuleType("accelerate.optimizer")  # its frame's module and function are what is read
    exec("class AcceleratedOptimizer:\n    def __init__(self, opt):\n        opt.load_state_dict(opt.state_dict())\n"
         "def load_state(opt, state):\n    opt.load_state_dict(state)\n", accelerate.__dict__)
    sys.modules["accelerate.optimizer"] = accelerate
    try:
        def prepared(params):
            opt = sgd(params)
            accelerate.AcceleratedOptimizer(opt)
            return opt
        _train(tmp_path / "fresh", 3, prepared)
        assert "resumed" not in read_run(tmp_path / "fresh").meta
        _, checkpoint = _train(None, 5, sgd)  # accelerator.load_state, a resume: still one
        _train(tmp_path / "resumed", 3, lambda params: sgd(params), state=checkpoint)
    finally:
        del sys.modules["accelerate.optimizer"]
    assert read_run(tmp_path / "resumed").meta["resumed"]["optimizer"] == "SGD"


RESUMED = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
opt.load_state_dict(torch.load("ckpt.pt"))
for _ in range(3):
    x = torch.randn(16, 6)
    loss = (model(x) - x[:, :1]).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
"""


def test_gradwatch_run_numbers_a_resumed_training_on_and_fix_trials_from_0(tmp_path):
    """`gradwatch run` numbers a resumed script's steps from its optimizer's count; a `gradwatch
    fix` trial of it counts from 0, as its budget and its locating run do (numbered on, the
    locating run stopped at the resumed run's length, short of the NaN it was to find)."""
    import os
    import subprocess
    import sys

    from gradwatch import runner
    from gradwatch.fix.inject import ENV_MAX_STEPS

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "ckpt.pt")
    (tmp_path / "resumed.py").write_text(RESUMED)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", "r", "resumed.py"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(read_run(tmp_path / "r").steps) == [5, 6, 7]
    assert "its steps are numbered from 5, the steps Adam's loaded state had taken" in result.stderr
    trial = runner.child_env(tmp_path / "t", {})  # as fix/trial.py starts one
    (tmp_path / "t").mkdir()
    trial.update({ENV_MAX_STEPS: "100", "OMP_NUM_THREADS": "1"})
    subprocess.run([sys.executable, "resumed.py"], cwd=tmp_path, env=trial, check=True, timeout=120)
    assert list(read_run(tmp_path / "t").steps) == [0, 1, 2]
