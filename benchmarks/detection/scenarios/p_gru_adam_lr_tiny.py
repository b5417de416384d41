"""Loss plateau: a GRU on digit rows with Adam lr 1e-6: the loss stays at chance."""
SCENARIO = {
    "name": "p_gru_adam_lr_tiny",
    "family": "gru",
    "optimizer": "adam",
    "expected": ["loss_plateau"],
    "allowed": [],
    "evidence": "measured: loss 2.31->2.3; acc 0.12->0.12; non-finite loss at step -; grads at step -; dL/ds first/last 0.08; |g| growth x1.8; dL/dx_0/dL/dx_T 0.028; dead -; saturated -; update lower/upper 1.1; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.SeqClassifier(nn.GRU(8, 64, batch_first=True), 64, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main()
