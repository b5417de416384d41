"""Healthy: an 8-layer sigmoid MLP that would vanish, kept trainable by BatchNorm before each sigmoid."""
SCENARIO = {
    "name": "h_mlp_sigmoid_batchnorm",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.32->0.11; acc 0.11->0.94; non-finite loss at step -; grads at step -; dL/ds first/last 1.9; |g| growth x1.9; dead -; saturated 0; update lower/upper 0.067; |w| x1.3",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    layers, width = [], 64
    for _ in range(8):
        layers += [nn.Linear(width, 64), nn.BatchNorm1d(64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
