"""Trains forever, flushing often, so a test can SIGKILL it mid-run."""
import sys

import torch
from torch import nn

import gradwatch

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
watch = gradwatch.watch(model, opt, flush_every=5, out=sys.argv[1])
step = 0
while True:
    loss = model(torch.randn(32, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    if step % 5 == 0:
        print(step, flush=True)
