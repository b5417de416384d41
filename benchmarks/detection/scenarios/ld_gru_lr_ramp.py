"""Loss divergence: a GRU classifier on digit rows whose SGD learning rate grows 4% a step with no
ceiling: past the stability limit the head's logits grow and the loss climbs for the rest of the
run, while the GRU's bounded state keeps the loss finite."""
SCENARIO = {
    "name": "ld_gru_lr_ramp",
    "family": "gru",
    "optimizer": "sgd",
    "expected": ["loss_divergence"],
    "allowed": ["exploding_gradient"],
    "evidence": "measured: loss 2.31->2.79e+04; acc 0.12->0.08; non-finite loss at step -; grads at step -; dL/ds first/last 9.6; |g| growth x2.9e+02; dL/dx_0/dL/dx_T 0.57; dead -; saturated -; update lower/upper 0.21; |w| x1.3e+04",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.SeqClassifier(nn.GRU(8, 64, batch_first=True), 64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.04**step)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=250, opt=opt, sched=sched)


if __name__ == "__main__":
    main()
