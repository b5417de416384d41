"""Exploding to NaN: a GRU regression on digit rows (pixel sum / 10) whose SGD learning rate grows
5% a step with no ceiling and no clipping, until gradients blow up."""
SCENARIO = {
    "name": "e_gru_lr_ramp_nan",
    "family": "gru",
    "optimizer": "sgd",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "loss_divergence"],
    "evidence": "measured: loss 3.82->-; non-finite loss at step 81; grads at step 81; dL/ds first/last 0.05; |g| growth x1.1e+19; dL/dx_0/dL/dx_T 0.029; dead -; saturated -; update lower/upper 0.066; |w| x4.3e+16",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    data = C.ink_targets(C.digits("seq"))
    model = C.SeqClassifier(nn.GRU(8, 32, batch_first=True), 32, 1)
    if healthy:  # Adam at a constant lr, gradient-norm clipping at 1
        opt, sched, clip = torch.optim.Adam(model.parameters(), lr=1e-3), None, 1.0
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.05**step)
        clip = None
    C.train(model, data, nn.MSELoss(), steps=120, opt=opt, sched=sched, clip=clip, eval_data=lambda: None)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
