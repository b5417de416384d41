"""Healthy: an LSTM reading digits row by row, Adam with gradient-norm clipping at 1."""
SCENARIO = {
    "name": "h_lstm_clip",
    "family": "lstm",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.31->0.186; acc 0.14->0.94; non-finite loss at step -; grads at step -; dL/ds first/last 0.17; |g| growth x42; dL/dx_0/dL/dx_T 4.3; dead -; saturated -; update lower/upper 1.5; |w| x2.2",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.SeqClassifier(nn.LSTM(8, 64, batch_first=True), 64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt, clip=1.0)


if __name__ == "__main__":
    main()
