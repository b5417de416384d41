"""Healthy: a vanilla tanh RNN on short sequences (8 steps: digit rows), Adam with clipping."""
SCENARIO = {
    "name": "h_rnn_tanh_short",
    "family": "rnn",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.3->0.175; acc 0.09->0.95; non-finite loss at step -; grads at step -; dL/ds first/last 0.16; |g| growth x13; dL/dx_0/dL/dx_T 3.6; dead -; saturated -; update lower/upper 1.2; |w| x1.8",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.SeqClassifier(nn.RNN(8, 64, batch_first=True), 64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt, clip=1.0)


if __name__ == "__main__":
    main()
