"""Saturation in a recurrent layer: a tanh RNN over digit rows with W_hh = 12 x orthogonal, so the
hidden state is pinned near +-1 from the first rows on."""
SCENARIO = {
    "name": "s_rnn_tanh_big_whh",
    "family": "rnn",
    "optimizer": "adam",
    "expected": ["saturation"],
    "allowed": [],
    "evidence": "measured: loss 2.4->2.03; acc 0.09->0.26; non-finite loss at step -; grads at step -; dL/ds first/last 33; |g| growth x2.3; dead -; saturated 0.68; update lower/upper 0.2; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


class SaturatedRNN(nn.Module):
    """nn.RNN with its tanh applied by an nn.Tanh module, so the saturation is observable."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.rec = nn.Linear(64, 64, bias=False)
        self.act = nn.Tanh()
        self.head = nn.Linear(64, 10)
        nn.init.orthogonal_(self.rec.weight, gain=12.0)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 64)
        for t in range(x.shape[1]):
            h = self.act(self.inp(x[:, t]) + self.rec(h))
        return self.head(h)


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # an LSTM of the same width, Adam, gradient-norm clipping at 1
        model = C.SeqClassifier(nn.LSTM(8, 64, batch_first=True), 64, 10)
        opt, clip = torch.optim.Adam(model.parameters(), lr=1e-3), 1.0
    else:
        model = SaturatedRNN()
        opt, clip = torch.optim.Adam(model.parameters(), lr=1e-3), None
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt, clip=clip)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
