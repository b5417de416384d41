"""Healthy: a small ReLU CNN on 8x8 digits, SGD with momentum."""
SCENARIO = {
    "name": "h_cnn_relu_sgd",
    "family": "cnn",
    "optimizer": "sgd",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.31->0.0171; acc 0.12->0.99; non-finite loss at step -; grads at step -; dL/ds first/last 0.24; |g| growth x16; dead 0.062; saturated -; update lower/upper 0.48; |w| x2.2",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    C.train(model, C.digits("img"), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main()
