"""Non-finite: a learning rate of 1e30 (a typo for 1e-3): one SGD step sends the weights to
~1e29, and the next forward pass overflows float32."""
SCENARIO = {
    "name": "n_lr_overflow",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["non_finite"],
    "allowed": [],
    "evidence": "measured: loss 2.33->-; acc 0.05->0.09; non-finite loss at step 1; grads at step 1; dL/ds first/last 0.26; |g| growth x-; dead 0.38; saturated -; update lower/upper -; |w| x-",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    model = C.mlp([64, 128, 128, 10], "relu", init="he_uniform")
    if healthy:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e30)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=100, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
