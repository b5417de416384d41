"""AutoTrainer demo Oscillating_Loss_Case: Dense(50, relu, he_uniform) + Dense(3, softmax,
glorot_uniform) on Blob, SGD lr 0.01 momentum 0.9, batch size 1 (AutoTrainer: oscillating loss,
not one of gradwatch's kinds; the label here is what measurement shows)."""
SCENARIO = {
    "name": "o_at_blob_oscillating_demo",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 9.34->0.84; acc 0.25->0.58; non-finite loss at step -; grads at step -; dL/ds first/last 0.13; |g| growth x6.5; dead 0.22; saturated -; update lower/upper 0.78; |w| x1.6",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([2, 50, 3], "relu", init="he_uniform")
    C.keras_init_(model[-1].weight, "glorot_uniform")
    model.append(nn.Softmax(dim=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    C.train(model, C.blobs(), C.keras_cce, steps=1400, bs=1, opt=opt)


if __name__ == "__main__":
    main()
