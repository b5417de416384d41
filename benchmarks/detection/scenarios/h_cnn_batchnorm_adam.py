"""Healthy: a conv-BatchNorm-ReLU CNN on CIFAR-shaped synthetic images, Adam."""
SCENARIO = {
    "name": "h_cnn_batchnorm_adam",
    "family": "cnn",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.33->0.235; acc 0.09->1.00; non-finite loss at step -; grads at step -; dL/ds first/last 0.012; |g| growth x1.2; dead 0; saturated -; update lower/upper 0.068; |w| x1.1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    C.train(model, C.cifar_like(), nn.CrossEntropyLoss(), steps=150, bs=32, opt=opt)


if __name__ == "__main__":
    main()
