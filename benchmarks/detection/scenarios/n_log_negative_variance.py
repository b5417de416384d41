"""Non-finite: a heteroscedastic regression whose predicted variance is a raw linear output (no
softplus) inside log(var): once training pushes it below zero, log() returns NaN."""
SCENARIO = {
    "name": "n_log_negative_variance",
    "family": "mlp",
    "optimizer": "adam",
    "expected": ["non_finite"],
    "allowed": ["exploding_gradient"],
    "evidence": "measured: loss 0.73->-; non-finite loss at step 31; grads at step -; dL/ds first/last 0.046; |g| growth x9.3e+03; dead 0; saturated -; update lower/upper 0.34; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def gaussian_nll(out, y):
    mean, var = out[:, :1], out[:, 1:]
    return (0.5 * torch.log(var) + (y - mean) ** 2 / (2 * var)).mean()


def gaussian_nll_softplus(out, y):
    mean, var = out[:, :1], nn.functional.softplus(out[:, 1:]) + 1e-6
    return (0.5 * torch.log(var) + (y - mean) ** 2 / (2 * var)).mean()


def main(healthy=False):
    torch.manual_seed(0)
    model = C.mlp([20, 64, 64, 2], "relu", init="he_uniform")
    with torch.no_grad():
        model[-1].weight.mul_(0.1)
        model[-1].bias[1] = 3.0  # start with a positive variance everywhere
    if healthy:  # the variance through softplus (always > 0), Adam at its usual lr
        opt, loss_fn = torch.optim.Adam(model.parameters(), lr=1e-3), gaussian_nll_softplus
    else:
        opt, loss_fn = torch.optim.Adam(model.parameters(), lr=3e-3), gaussian_nll
    C.train(model, C.regression(), loss_fn, steps=300, opt=opt, eval_data=lambda: None)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
