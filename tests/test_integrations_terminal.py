"""The live status line: drawn on stderr in place, only on a terminal, never on a line of the
script's own output."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import textwrap

import torch
from torch import nn

import gradwatch as gw
from gradwatch.integrations.terminal import CLEAR, StatusLine, status_text


def test_status_text():
    text = status_text(120, 0.25, {"fc0": 1e-6, "fc1": 0.5, "fc2": 1.0}, 2)
    assert text == "gradwatch  step 120  loss 0.25  grad min/max 1.0e-06 in 'fc0'  findings 2"
    assert "grad non-finite (fc1)" in status_text(3, None, {"fc0": 1.0, "fc1": float("inf")}, 0)
    # the store keeps a NaN loss as +inf: the line said "loss inf" for a NaN loss
    assert "loss non-finite  grad non-finite" in status_text(3, float("inf"), {"fc0": float("inf")}, 1)


def train(watch_kwargs, stream, steps=20):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.watch(model, opt, flush_every=5, **watch_kwargs)
    status = StatusLine(stream=stream, width=200).install(watch)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(16, 4)), torch.randn(16, 1)).backward()
        opt.step()
    watch.detach()
    status.close()
    return watch


def test_status_line_redraws_in_place(tmp_path, capsys):
    stream = io.StringIO()
    train({"out": tmp_path, "warn": False}, stream)
    text = stream.getvalue()
    assert text.count(CLEAR + "gradwatch  step") == 4  # one draw per flush
    last = text.rsplit(CLEAR, 1)[1]
    assert last.startswith("gradwatch  step 19  loss ") and "grad min/max" in last and last.endswith("findings 0\n")
    assert capsys.readouterr().out == ""  # nothing on stdout


def test_in_memory_watch(capsys):
    stream = io.StringIO()
    train({"warn": False}, stream)
    assert "gradwatch  step 19" in stream.getvalue()


SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import gradwatch as gw
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.watch(model, opt, flush_every=3, warn=False)  # on a terminal: the status line is on
    for i in range(12):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(16, 4)), torch.randn(16, 1)).backward()
        opt.step()
        print(f"epoch line {i}")
    watch.detach()
""")


def test_on_a_terminal_the_script_output_keeps_its_own_lines(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    raw = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=60) == 0
    os.close(primary)
    # what the terminal shows on each line: the text after the last "erase line"
    shown = [line.rsplit(CLEAR, 1)[-1].rstrip("\r") for line in raw.decode().split("\n")]
    assert [l for l in shown if l.startswith("epoch")] == [f"epoch line {i}" for i in range(12)]
    assert all("gradwatch" not in l for l in shown if "epoch" in l)
    assert shown[-2].startswith("gradwatch  step 11")  # the last status stays, on its own line
