"""Healthy: a He-init ReLU MLP on Blob data with a hand-written SGD loop (p.data -= lr * p.grad)."""
SCENARIO = {
    "name": "h_mlp_manual_sgd",
    "family": "mlp",
    "optimizer": "manual",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 1.62->0.537; acc 0.54->0.83; non-finite loss at step -; grads at step -; dL/ds first/last 0.14; |g| growth x24; dead 0.22; saturated -; update lower/upper 0.14; |w| x1",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([2, 32, 32, 3], "relu", init="he_uniform")
    loss_fn = lambda out, y: nn.functional.cross_entropy(out, y.argmax(1))
    C.train(model, C.blobs(), loss_fn, steps=300, manual_lr=0.1)


if __name__ == "__main__":
    main()
