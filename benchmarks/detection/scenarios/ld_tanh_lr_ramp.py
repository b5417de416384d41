"""Loss divergence: a tanh MLP classifier whose SGD learning rate grows 5% a step with no ceiling:
the logits grow without bound, so the loss climbs to ~1e6 while the tanh keeps gradients finite."""
SCENARIO = {
    "name": "ld_tanh_lr_ramp",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["loss_divergence"],
    "allowed": ["vanishing_gradient", "saturation"],
    "evidence": "measured: loss 2.28->1.87e+06; acc 0.12->0.09; non-finite loss at step -; grads at step -; dL/ds first/last 0; |g| growth x9.1; dead -; saturated 1; update lower/upper 0.02; |w| x2.1e+04",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 10], "tanh", init="glorot_uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.05**step)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=300, opt=opt, sched=sched)


if __name__ == "__main__":
    main()
