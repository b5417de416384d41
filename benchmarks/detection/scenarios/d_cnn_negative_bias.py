"""Dead units: a ReLU CNN whose conv biases start at -3: most channels are 0 everywhere."""
SCENARIO = {
    "name": "d_cnn_negative_bias",
    "family": "cnn",
    "optimizer": "adam",
    "expected": ["dead_units"],
    "allowed": ["vanishing_gradient", "stalled_layers", "loss_plateau"],
    "evidence": "measured: loss 2.3->2.3; acc 0.10->0.10; non-finite loss at step -; grads at step -; dL/ds first/last 0; |g| growth x1.5; dead 1; saturated -; update lower/upper 0; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    model = C.small_cnn()
    if not healthy:  # healthy: torch's default conv biases
        for conv in (model[0], model[2]):
            nn.init.constant_(conv.bias, -3.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    C.train(model, C.digits("img"), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
