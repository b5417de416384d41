"""Loss plateau: a healthy He-init ReLU MLP with SGD lr 1e-5: the loss barely moves from chance."""
SCENARIO = {
    "name": "p_sgd_lr_tiny",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["loss_plateau"],
    "allowed": [],
    "evidence": "measured: loss 2.33->2.42; acc 0.05->0.06; non-finite loss at step -; grads at step -; dL/ds first/last 0.27; |g| growth x1.6; dead 0.07; saturated -; update lower/upper 0.18; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 10], "relu", init="he_uniform")
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
