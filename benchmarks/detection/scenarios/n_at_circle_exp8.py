"""AutoTrainer port dd:circle:model_0ae2cd88: eight Dense(5) he_uniform with exponential
activations + Dense(1, sigmoid) on Circle, Adam 1e-3, batch 128, binary cross-entropy."""
SCENARIO = {
    "name": "n_at_circle_exp8",
    "family": "mlp",
    "optimizer": "adam",
    "expected": ["non_finite"],
    "allowed": [],
    "evidence": "measured: loss -->-; acc 0.43->0.50; non-finite loss at step 0; grads at step 0; dL/ds first/last -; |g| growth x-; dead -; saturated -; update lower/upper -; |w| x-",
}

import sys

import torch
from torch import nn

import _common as C


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def main(healthy=False):
    torch.manual_seed(0)
    layers, width = [], 2
    for _ in range(8):
        lin = nn.Linear(width, 5)
        C.keras_init_(lin.weight, "he_uniform")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU() if healthy else Exp()]  # healthy: ReLU in place of exp
        width = 5
    out = nn.Linear(5, 1)
    C.keras_init_(out.weight, "he_uniform")
    nn.init.zeros_(out.bias)
    model = nn.Sequential(*layers, out, nn.Sigmoid())
    opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.circles(), C.keras_bce, steps=300, bs=128, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
