"""AutoTrainer Motivation DyingReLU: 34 Dense(128, glorot_uniform) + ReLU and Dense(10, softmax) on
784-pixel MNIST-shaped input (digits upsampled to 28x28), Adam 1e-3 (Keras defaults), batch 32."""
SCENARIO = {
    "name": "d_at_mnist_dyingrelu",
    "family": "mlp",
    "optimizer": "adam",
    "expected": ["dead_units"],
    "allowed": ["exploding_gradient"],
    "evidence": "measured: loss 2.3->1.67; acc 0.12->0.34; non-finite loss at step -; grads at step -; dL/ds first/last 0.11; |g| growth x6.4e+02; dead 0.59; saturated -; update lower/upper 0.55; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    if healthy:  # He init for the ReLUs; Adam at 1e-4, as 35 plain layers need
        model = C.mlp([784] + [128] * 34 + [10], "relu", init="he_uniform")
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        model = C.mlp([784] + [128] * 34 + [10], "relu", init="glorot_uniform")
        opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.digits("flat784", size=28), nn.CrossEntropyLoss(), steps=300, bs=32, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
