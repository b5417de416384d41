"""Dead units: a ReLU MLP with Adam lr 0.3: the first updates spike the loss and leave every unit
of a hidden layer dead; the loss returns to chance and stays there."""
SCENARIO = {
    "name": "d_adam_lr_high",
    "family": "mlp",
    "optimizer": "adam",
    "expected": ["dead_units"],
    "allowed": ["vanishing_gradient", "stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.33->2.32; acc 0.05->0.08; non-finite loss at step -; grads at step -; dL/ds first/last 0; |g| growth x7.9; dead 1; saturated -; update lower/upper 0.00067; |w| x11",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 10], "relu", init="he_uniform")
    if healthy:  # Adam at its usual lr
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.3)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
