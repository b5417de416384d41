"""Stalled layers: a hand-written SGD loop that updates only the parameters of the last two layers
(the list was built from model[4:]); the first layers' weights never change."""
SCENARIO = {
    "name": "st_manual_forgot_lower",
    "family": "mlp",
    "optimizer": "manual",
    "expected": ["stalled_layers"],
    "allowed": [],
    "evidence": "measured: loss 2.59->0.294; acc 0.12->0.93; non-finite loss at step -; grads at step -; dL/ds first/last 0.9; |g| growth x28; dead 0.12; saturated -; update lower/upper 0; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 128, 10], "relu", init="he_uniform")
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, manual_lr=0.1, params=model[4:].parameters())


if __name__ == "__main__":
    main()
