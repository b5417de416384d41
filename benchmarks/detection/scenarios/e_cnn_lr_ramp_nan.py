"""Exploding to NaN: a tanh CNN regression on digit images (ink / 10) whose SGD learning rate grows
5% a step with no ceiling: gradients grow over tens of steps until the loss overflows."""
SCENARIO = {
    "name": "e_cnn_lr_ramp_nan",
    "family": "cnn",
    "optimizer": "sgd",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "vanishing_gradient", "loss_divergence"],
    "evidence": "measured: loss 4.41->-; non-finite loss at step 111; grads at step 110; dL/ds first/last 0.0096; |g| growth x1.6e+16; dead -; saturated 0; update lower/upper 0.063; |w| x1.3e+16",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    data = C.ink_targets(C.digits("img"))
    act = nn.ReLU if healthy else nn.Tanh
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), act(),
        nn.Conv2d(16, 16, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 16, 1),
    )
    if healthy:  # ReLU + He, Adam at a constant lr
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
        opt, sched = torch.optim.Adam(model.parameters(), lr=1e-3), None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.001)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.05**step)
    C.train(model, data, nn.MSELoss(), steps=200, opt=opt, sched=sched, eval_data=lambda: None)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
