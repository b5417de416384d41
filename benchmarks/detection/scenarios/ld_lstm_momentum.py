"""Loss divergence: an LSTM on digit rows with SGD lr 1.0 and momentum 0.99 and no clipping: the
loss oscillates with growing amplitude."""
SCENARIO = {
    "name": "ld_lstm_momentum",
    "family": "lstm",
    "optimizer": "sgd",
    "expected": ["loss_divergence"],
    "allowed": ["vanishing_gradient"],
    "evidence": "measured: loss 2.31->7.86; acc 0.14->0.08; non-finite loss at step -; grads at step -; dL/ds first/last 7.3; |g| growth x25; dL/dx_0/dL/dx_T 4.3e-10; dead -; saturated -; update lower/upper 0.57; |w| x89",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.SeqClassifier(nn.LSTM(8, 64, batch_first=True), 64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.99)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
