"""AutoTrainer port dd:cifar10:model_1d575a45: sigmoid LeNet with eight sigmoid dense layers
(he_normal) on CIFAR-shaped synthetic 16x16 images, Keras-style Adam 1e-3."""
SCENARIO = {
    "name": "v_at_cifar_sigmoid",
    "family": "cnn",
    "optimizer": "adam",
    "expected": ["vanishing_gradient"],
    "allowed": [],
    "evidence": "measured: loss 2.54->1.93; acc 0.11->0.17; non-finite loss at step -; grads at step -; dL/ds first/last 3.8e-07; |g| growth x1.7; dead -; saturated 0.23; update lower/upper 1.2; |w| x1.1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    act = nn.ReLU if healthy else nn.Sigmoid  # healthy: ReLU (He init already)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 5), act(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), act(), nn.MaxPool2d(2), nn.Flatten(),
        C.mlp([64, 120] + [84] * 7 + [10], "relu" if healthy else "sigmoid"),
    )
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            C.keras_init_(m.weight, "he_normal")
            nn.init.zeros_(m.bias)
    opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.cifar_like(), nn.CrossEntropyLoss(), steps=200, bs=32, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
