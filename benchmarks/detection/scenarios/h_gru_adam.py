"""Healthy: a GRU reading digits row by row, Adam."""
SCENARIO = {
    "name": "h_gru_adam",
    "family": "gru",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.31->0.143; acc 0.12->0.93; non-finite loss at step -; grads at step -; dL/ds first/last 0.21; |g| growth x20; dL/dx_0/dL/dx_T 2.1; dead -; saturated -; update lower/upper 1.5; |w| x2.3",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.SeqClassifier(nn.GRU(8, 64, batch_first=True), 64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
