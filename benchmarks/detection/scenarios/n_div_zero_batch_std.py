"""Non-finite: MSE divided by the batch's target variance; one batch of the sequential data order
holds identical targets, so the division is by zero at a known step and the weights turn NaN."""
SCENARIO = {
    "name": "n_div_zero_batch_std",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["non_finite"],
    "allowed": [],
    "evidence": "measured: loss 2.01->-; non-finite loss at step 10; grads at step 10; dL/ds first/last 0.14; |g| growth x2.8; dead 0; saturated -; update lower/upper -; |w| x-",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    (x, y), _ = C.regression()
    y[640:704] = 0.5  # a block of constant targets (e.g. a sensor stuck at one value)
    model = C.mlp([20, 64, 64, 1], "relu", init="he_uniform")
    if healthy:  # Adam; normalised by the variance of all targets, a constant, not the batch's
        opt, scale = torch.optim.Adam(model.parameters(), lr=1e-3), y.var()
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for epoch in range(3):
        for start in range(0, len(x), 64):
            xb, yb = x[start:start + 64], y[start:start + 64]
            loss = ((model(xb) - yb) ** 2).mean() / (scale if healthy else yb.var())
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    C.report(losses, model=model, x=x)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
