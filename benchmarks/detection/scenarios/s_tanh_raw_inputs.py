"""Saturation: a tanh MLP fed raw, unnormalised pixel values (0..16) with torch's default init:
first-layer pre-activations of several units, so the tanh outputs sit at +-1."""
SCENARIO = {
    "name": "s_tanh_raw_inputs",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["saturation"],
    "allowed": [],
    "evidence": "measured: loss 7.86->0.735; acc 0.12->0.60; non-finite loss at step -; grads at step -; dL/ds first/last 0.27; |g| growth x1.2; dead -; saturated 0.94; update lower/upper 2; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    (x, y), (xe, ye) = C.digits()
    if healthy:  # inputs kept in [0, 1]; ReLU + He, Adam
        model = C.mlp([64, 128, 128, 10], "relu", init="he_uniform")
        C.train(model, ((x, y), (xe, ye)), nn.CrossEntropyLoss(), steps=300, opt=torch.optim.Adam(model.parameters(), lr=1e-3))
        return
    model = C.mlp([64, 128, 128, 10], "tanh", init="normal", std=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    C.train(model, ((x * 16, y), (xe * 16, ye)), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
