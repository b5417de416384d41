"""Vanishing through time: a vanilla tanh RNN on 60-step sequences whose label is set by the first
step, with W_hh scaled to spectral radius 0.5, so dL/dx_t decays ~0.5^(T-t)."""
SCENARIO = {
    "name": "v_rnn_tanh_long",
    "family": "rnn",
    "optimizer": "adam",
    "expected": ["vanishing_gradient"],
    "allowed": ["loss_plateau"],
    "evidence": "measured: loss 0.7->0.68; acc 0.51->0.46; non-finite loss at step -; grads at step -; dL/ds first/last 0.022; |g| growth x1.4; dL/dx_0/dL/dx_T 2.2e-17; dead -; saturated -; update lower/upper 1.5; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # an LSTM, Adam lr 1e-2, gradient-norm clipping at 1
        model = C.SeqClassifier(nn.LSTM(4, 32, batch_first=True), 32, 2)
        C.train(model, C.first_token_task(T=60), nn.CrossEntropyLoss(), steps=200, opt=torch.optim.Adam(model.parameters(), lr=1e-2), clip=1.0)
        return
    rnn = nn.RNN(4, 32, batch_first=True)
    with torch.no_grad():
        w = rnn.weight_hh_l0
        w.mul_(0.5 / torch.linalg.eigvals(w).abs().max())
    model = C.SeqClassifier(rnn, 32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    C.train(model, C.first_token_task(T=60), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
