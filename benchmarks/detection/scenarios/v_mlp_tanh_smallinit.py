"""Vanishing: a 10-layer tanh MLP initialised with N(0, 0.02^2) weights (far below Glorot), SGD."""
SCENARIO = {
    "name": "v_mlp_tanh_smallinit",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["vanishing_gradient"],
    "allowed": ["stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.3->2.31; acc 0.18->0.11; non-finite loss at step -; grads at step -; dL/ds first/last 4.7e-09; |g| growth x1.9; dead -; saturated 0; update lower/upper 5.6e-08; |w| x1",
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
        model = C.mlp([64] * 11 + [10], "tanh", init="normal", std=0.02)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
