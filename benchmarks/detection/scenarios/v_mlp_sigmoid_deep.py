"""Vanishing: a 10-layer sigmoid MLP with torch's default init on digits, plain SGD."""
SCENARIO = {
    "name": "v_mlp_sigmoid_deep",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["vanishing_gradient"],
    "allowed": ["stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.31->2.31; acc 0.12->0.11; non-finite loss at step -; grads at step -; dL/ds first/last 9.9e-10; |g| growth x1.8; dead -; saturated 0; update lower/upper 5e-11; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # ReLU + He, Adam
        model = C.mlp([64] * 11 + [10], "relu", init="he_uniform")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        model = C.mlp([64] * 11 + [10], "sigmoid")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
