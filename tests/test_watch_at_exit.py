"""A watch made in code stores its last steps when the script ends without detach() or on an
error: a tester's RNN script crashed after 62 steps and its store held 50 (flushed every 50), and
with 31 steps it held no store at all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gradwatch.store import read_run

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import gradwatch as gw
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.watch(model, opt, out=sys.argv[1], warn=False, status=False)
    for step in range(int(sys.argv[2])):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
    if sys.argv[3] == "crash":
        raise RuntimeError("the script's own error")
""")


@pytest.mark.parametrize("steps,end", [(31, "crash"), (62, "crash"), (31, "exit")])
def test_the_steps_since_the_last_flush_are_stored(tmp_path, steps, end):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(out), str(steps), end], env=env,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode != 0) == (end == "crash"), done.stderr
    assert end != "crash" or "the script's own error" in done.stderr  # the script's error, as it was
    run = read_run(out)
    assert len(run.steps) == steps and run.steps[-1] == steps - 1


def test_a_store_written_in_code_is_not_said_partial(tmp_path):
    """The in-code watch began writing its script's argv, under the key `gradwatch run` writes its
    command under: every healthy in-code run was said "partial run: `gradwatch run` was killed"."""
    import torch
    from torch import nn

    import gradwatch as gw
    from gradwatch.diagnose.advice import Context, _fix_command
    from gradwatch.store.ending import end_note

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", warn=False, status=False):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    run = read_run(tmp_path / "run")
    assert end_note(run.meta, int(run.steps[-1])) is None and "command" not in run.meta
    assert run.meta["argv"] == sys.argv and _fix_command(Context(run)).startswith("`gradwatch fix -- python ")
