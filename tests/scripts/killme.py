"""Trains forever, printing each step, so a test can kill it mid-run.

killme.py OUT: watched in code, flushing every 5 steps into OUT.
killme.py --pid FILE: no gradwatch import (for `gradwatch run`/`fix`); writes its pid to FILE first.
"""
import os
import sys

import torch
from torch import nn

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
if sys.argv[1] == "--pid":
    with open(sys.argv[2], "w") as f:
        f.write(str(os.getpid()))
else:
    import gradwatch

    watch = gradwatch.watch(model, opt, flush_every=5, out=sys.argv[1])
step = 0
while True:
    loss = model(torch.randn(32, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    print(step, flush=True)
