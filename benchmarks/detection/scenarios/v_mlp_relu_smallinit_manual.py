"""Vanishing: an 8-layer ReLU MLP initialised with N(0, 0.01^2) weights, hand-written SGD loop."""
SCENARIO = {
    "name": "v_mlp_relu_smallinit_manual",
    "family": "mlp",
    "optimizer": "manual",
    "expected": ["vanishing_gradient"],
    "allowed": ["dead_units", "stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.3->2.3; acc 0.07->0.09; non-finite loss at step -; grads at step -; dL/ds first/last 6.4e-12; |g| growth x1.8; dead 0.92; saturated -; update lower/upper 6.7e-12; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # He init, Adam
        model = C.mlp([64] * 9 + [10], "relu", init="he_uniform")
        C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=torch.optim.Adam(model.parameters(), lr=1e-3))
        return
    model = C.mlp([64] * 9 + [10], "relu", init="normal", std=0.01)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, manual_lr=0.1)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
