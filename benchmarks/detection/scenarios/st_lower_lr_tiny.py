"""Stalled layers: a ReLU MLP whose first two layers sit in a parameter group with lr 1e-6 (a
fine-tuning config meant for a pretrained backbone, applied to a fresh one); the head trains."""
SCENARIO = {
    "name": "st_lower_lr_tiny",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["stalled_layers"],
    "allowed": [],
    "evidence": "measured: loss 2.59->0.0917; acc 0.12->0.96; non-finite loss at step -; grads at step -; dL/ds first/last 1.9; |g| growth x3; dead 0.2; saturated -; update lower/upper 4e-05; |w| x1.1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 128, 10], "relu", init="he_uniform")
    lower = [*model[0].parameters(), *model[2].parameters()]
    upper = [*model[4].parameters(), *model[6].parameters()]
    opt = torch.optim.SGD([{"params": lower, "lr": 1e-6}, {"params": upper, "lr": 0.05}], momentum=0.9)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
