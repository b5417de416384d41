"""Exploding: an 8-layer ReLU MLP initialised with N(0, 0.5^2) weights (about 2.8x He), SGD."""
SCENARIO = {
    "name": "e_mlp_large_init",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "dead_units", "loss_divergence"],
    "evidence": "measured: loss 7.69e+03->-; acc 0.07->0.09; non-finite loss at step 2; grads at step 2; dL/ds first/last 1.9e+03; |g| growth x2; dead 0.7; saturated -; update lower/upper -; |w| x-",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # He init
        model = C.mlp([64] * 9 + [10], "relu", init="he_uniform")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        model = C.mlp([64] * 9 + [10], "relu", init="normal", std=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
