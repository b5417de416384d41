"""Healthy: a ReLU MLP with torch's default init, trained with Adam."""
SCENARIO = {
    "name": "h_mlp_relu_adam",
    "family": "mlp",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.32->0.104; acc 0.06->0.97; non-finite loss at step -; grads at step -; dL/ds first/last 0.66; |g| growth x5.6; dead 0.055; saturated -; update lower/upper 0.93; |w| x1.5",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 10], "relu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
