"""Healthy: a 4-layer ReLU MLP with He init on digits, SGD with momentum."""
SCENARIO = {
    "name": "h_mlp_relu_he_sgd",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.59->0.0236; acc 0.12->0.97; non-finite loss at step -; grads at step -; dL/ds first/last 1.3; |g| growth x2.7; dead 0.039; saturated -; update lower/upper 0.51; |w| x1.1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 128, 10], "relu", init="he_uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
