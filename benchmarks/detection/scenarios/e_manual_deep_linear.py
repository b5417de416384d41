"""Exploding to NaN: a 3-layer linear regression net trained by a hand-written SGD loop whose
learning rate grows 5% a step: past the stability limit the loss and gradients grow until they
overflow."""
SCENARIO = {
    "name": "e_manual_deep_linear",
    "family": "mlp",
    "optimizer": "manual",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "loss_divergence"],
    "evidence": "measured: loss 1.17->-; non-finite loss at step 81; grads at step 81; dL/ds first/last 0.19; |g| growth x2.6e+09; dead -; saturated -; update lower/upper 0.12; |w| x27",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # ReLU + He, Adam at a constant lr
        model = C.mlp([20, 64, 64, 1], "relu", init="he_uniform")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        model = C.mlp([20, 64, 64, 1], "linear", init="glorot_uniform")
    (x, y), _ = C.regression()
    losses = []
    for step, idx in enumerate(C.batches(len(x), 64, 120)):
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        losses.append(loss.item())
        model.zero_grad()
        loss.backward()
        if healthy:
            opt.step()
            continue
        lr = 0.01 * 1.05**step
        with torch.no_grad():
            for p in model.parameters():
                p.data -= lr * p.grad
    C.report(losses, model=model, x=x)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
