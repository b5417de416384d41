"""Saturation: a 4-layer sigmoid MLP initialised with N(0, 3^2) weights (24x Glorot): pre-activations
of tens, so most sigmoid outputs sit at 0 or 1."""
SCENARIO = {
    "name": "s_mlp_sigmoid_bigweights",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["saturation"],
    "allowed": [],
    "evidence": "measured: loss 24.7->1.37; acc 0.12->0.53; non-finite loss at step -; grads at step -; dL/ds first/last 1; |g| growth x1.3; dead -; saturated 0.83; update lower/upper 0.68; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # ReLU + He, Adam
        model = C.mlp([64, 64, 64, 64, 10], "relu", init="he_uniform")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        model = C.mlp([64, 64, 64, 64, 10], "sigmoid", init="normal", std=3.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
