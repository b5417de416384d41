"""Loss plateau: a CNN whose LambdaLR schedule returns 0 after step 20 (a decay meant per epoch,
stepped per batch): the weights freeze and the loss stays where it was, far above the healthy run."""
SCENARIO = {
    "name": "p_cnn_sched_zero",
    "family": "cnn",
    "optimizer": "sgd",
    "expected": ["loss_plateau"],
    "allowed": [],
    "evidence": "measured: loss 2.31->2.3; acc 0.12->0.06; non-finite loss at step -; grads at step -; dL/ds first/last 0.015; |g| growth x1.4; dead 0.031; saturated -; update lower/upper -; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 20 else 0.0)
    C.train(model, C.digits("img"), nn.CrossEntropyLoss(), steps=200, opt=opt, sched=sched)


if __name__ == "__main__":
    main()
