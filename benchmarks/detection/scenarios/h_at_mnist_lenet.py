"""AutoTrainer port dd:mnist:lenet_seed: LeNet-5 (he_normal, ReLU) on MNIST-shaped input (digits
upsampled to 28x28), Keras-style Adam and categorical cross-entropy."""
SCENARIO = {
    "name": "h_at_mnist_lenet",
    "family": "cnn",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.4->0.0443; acc 0.12->0.98; non-finite loss at step -; grads at step -; dL/ds first/last 0.18; |g| growth x2.7; dead 0.25; saturated -; update lower/upper 0.62; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            C.keras_init_(m.weight, "he_normal")
            nn.init.zeros_(m.bias)
    opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.digits("img", size=28), nn.CrossEntropyLoss(), steps=200, opt=opt)


if __name__ == "__main__":
    main()
