"""Exploding: an LSTM regression on digit rows (pixel sum / 10), SGD lr 2.0, no clipping:
gradients grow over a few tens of steps until the loss overflows."""
SCENARIO = {
    "name": "e_lstm_sgd_lr_high",
    "family": "lstm",
    "optimizer": "sgd",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "stalled_layers", "loss_divergence"],
    "evidence": "measured: loss 3.42->-; non-finite loss at step 19; grads at step 19; dL/ds first/last 0.034; |g| growth x8.1e+11; dL/dx_0/dL/dx_T 0.0086; dead -; saturated -; update lower/upper 4.3e-11; |w| x1.2e+09",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    data = C.ink_targets(C.digits("seq"))
    model = C.SeqClassifier(nn.LSTM(8, 32, batch_first=True), 32, 1)
    if healthy:  # Adam, gradient-norm clipping at 1
        opt, clip = torch.optim.Adam(model.parameters(), lr=1e-3), 1.0
    else:
        opt, clip = torch.optim.SGD(model.parameters(), lr=2.0), None
    C.train(model, data, nn.MSELoss(), steps=100, opt=opt, clip=clip, eval_data=lambda: None)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
