"""Dead units: a He-init ReLU MLP hit by a few huge SGD steps (lr 2.0): large negative bias updates
push most hidden units below zero for every input, and they never recover."""
SCENARIO = {
    "name": "d_relu_huge_lr",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["dead_units"],
    "allowed": ["vanishing_gradient", "stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.33->2.31; acc 0.05->0.11; non-finite loss at step -; grads at step -; dL/ds first/last 0; |g| growth x5.9; dead 1; saturated -; update lower/upper 0; |w| x12",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 10], "relu", init="he_uniform")
    if healthy:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=2.0)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
