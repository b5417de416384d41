"""Exploding through time: a ReLU RNN on 20-step sequences with W_hh = 1.8 x orthogonal (spectral
radius 1.8), SGD with no clipping."""
SCENARIO = {
    "name": "e_rnn_relu_whh_large",
    "family": "rnn",
    "optimizer": "sgd",
    "expected": ["exploding_gradient"],
    "allowed": ["non_finite", "loss_divergence"],
    "evidence": "measured: loss 8.94->-; acc 0.44->0.51; non-finite loss at step 4; grads at step 4; dL/ds first/last 0.032; |g| growth x7.6e+05; dL/dx_0/dL/dx_T 1.5e+02; dead -; saturated -; update lower/upper -; |w| x-",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # an LSTM, Adam lr 1e-2, gradient-norm clipping at 1
        model = C.SeqClassifier(nn.LSTM(4, 32, batch_first=True), 32, 2)
        opt, clip = torch.optim.Adam(model.parameters(), lr=1e-2), 1.0
    else:
        rnn = nn.RNN(4, 32, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            nn.init.orthogonal_(rnn.weight_hh_l0, gain=1.8)
        model = C.SeqClassifier(rnn, 32, 2)
        opt, clip = torch.optim.SGD(model.parameters(), lr=0.01), None
    C.train(model, C.first_token_task(T=20), nn.CrossEntropyLoss(), steps=100, opt=opt, clip=clip)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
