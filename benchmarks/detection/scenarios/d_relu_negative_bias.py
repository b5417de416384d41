"""Dead units: a ReLU MLP whose hidden biases are initialised to -2 (a common 'sparse
activations' mistake): most ReLUs output 0 for every input from the first step on."""
SCENARIO = {
    "name": "d_relu_negative_bias",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["dead_units"],
    "allowed": ["vanishing_gradient", "stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.3->2.31; acc 0.09->0.09; non-finite loss at step -; grads at step -; dL/ds first/last 0; |g| growth x1.8; dead 1; saturated -; update lower/upper 0; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # zero biases
        model = C.mlp([64, 128, 128, 128, 10], "relu", init="he_uniform")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        model = C.mlp([64, 128, 128, 128, 10], "relu", init="he_uniform", bias=-2.0)
        nn.init.zeros_(model[-1].bias)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
