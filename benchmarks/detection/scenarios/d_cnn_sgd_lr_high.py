"""Dead units: the small ReLU CNN of h_cnn_relu_sgd with SGD lr 0.5 and momentum 0.9: the first
large updates push every channel negative, and the net never recovers."""
SCENARIO = {
    "name": "d_cnn_sgd_lr_high",
    "family": "cnn",
    "optimizer": "sgd",
    "expected": ["dead_units"],
    "allowed": ["vanishing_gradient", "loss_plateau"],
    "evidence": "measured: loss 2.31->2.31; acc 0.12->0.09; non-finite loss at step -; grads at step -; dL/ds first/last 0; |g| growth x58; dead 1; saturated -; update lower/upper 0.02; |w| x34",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    model = C.small_cnn()
    if healthy:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    C.train(model, C.digits("img"), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
