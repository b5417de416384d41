"""Stalled layers: a CNN fed images scaled to 1e-3 of their range with plain SGD: the first conv's
weight gradient (input x output-gradient) is ~1000x smaller than the others', so it barely moves."""
SCENARIO = {
    "name": "st_cnn_input_scale",
    "family": "cnn",
    "optimizer": "sgd",
    "expected": ["stalled_layers"],
    "allowed": [],
    "evidence": "measured: loss 2.31->0.0692; acc 0.12->0.98; non-finite loss at step -; grads at step -; dL/ds first/last 0.39; |g| growth x6.6; dead 0.062; saturated -; update lower/upper 0.00079; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    (x, y), (xe, ye) = C.digits("img")
    model = C.small_cnn()
    with torch.no_grad():
        model[0].weight.mul_(1000.0)  # so the forward signal is the usual size
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    C.train(model, ((x * 1e-3, y), (xe * 1e-3, ye)), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main()
