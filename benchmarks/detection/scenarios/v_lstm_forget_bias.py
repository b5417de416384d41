"""Vanishing through time: an LSTM whose forget-gate bias is -6 (it forgets every step), on
40-step sequences whose label is set by the first step."""
SCENARIO = {
    "name": "v_lstm_forget_bias",
    "family": "lstm",
    "optimizer": "adam",
    "expected": ["vanishing_gradient"],
    "allowed": ["loss_plateau"],
    "evidence": "measured: loss 0.693->0.687; acc 0.48->0.50; non-finite loss at step -; grads at step -; dL/ds first/last 0.028; |g| growth x4.1; dL/dx_0/dL/dx_T 0; dead -; saturated -; update lower/upper 0.48; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 32, batch_first=True)
    with torch.no_grad():
        for b in (lstm.bias_ih_l0, lstm.bias_hh_l0):
            b[32:64] = 0.5 if healthy else -3.0  # gate order i, f, g, o: forget-gate bias -6 in total (healthy +1)
    model = C.SeqClassifier(lstm, 32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if healthy else 1e-3)  # healthy: lr 1e-2, clipping at 1
    C.train(model, C.first_token_task(T=40), nn.CrossEntropyLoss(), steps=200, opt=opt, clip=1.0 if healthy else None)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
