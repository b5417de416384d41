"""Exploding to NaN: a tanh MLP regression (MSE) whose SGD learning rate is ramped up 3% a step
(a warm-up with no ceiling): once the rate passes the stability limit, gradients and weights grow
geometrically over tens of steps until the loss overflows."""
SCENARIO = {
    "name": "e_mlp_lr_ramp_nan",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "loss_divergence"],
    "evidence": "measured: loss 0.932->-; non-finite loss at step 159; grads at step 154; dL/ds first/last 0.13; |g| growth x5.3e+18; dead -; saturated 0; update lower/upper 0.37; |w| x6.8e+08",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # ReLU + He, Adam at a constant lr
        model = C.mlp([20, 64, 64, 1], "relu", init="he_uniform")
        opt, sched = torch.optim.Adam(model.parameters(), lr=1e-3), None
    else:
        model = C.mlp([20, 64, 64, 1], "tanh", init="glorot_uniform")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.03**step)
    C.train(model, C.regression(), nn.MSELoss(), steps=200, opt=opt, sched=sched, eval_data=lambda: None)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
