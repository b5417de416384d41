"""Healthy: a 4-layer tanh MLP with Glorot (Xavier) init on digits, plain SGD."""
SCENARIO = {
    "name": "h_mlp_tanh_xavier",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.27->0.125; acc 0.06->0.97; non-finite loss at step -; grads at step -; dL/ds first/last 1.1; |g| growth x1.2; dead -; saturated 0; update lower/upper 0.89; |w| x1.1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 64, 64, 64, 10], "tanh", init="glorot_uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
