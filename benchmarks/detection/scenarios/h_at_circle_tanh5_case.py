"""AutoTrainer port case:circle:model_random_5057d0d1 (AutoTrainer status: normal): five tanh
Dense(5) he_uniform, sigmoid output (RandomNormal, stddev 0.05), Adam 1e-3, batch 128, BCE."""
SCENARIO = {
    "name": "h_at_circle_tanh5_case",
    "family": "mlp",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 0.689->0.569; acc 0.49->0.74; non-finite loss at step -; grads at step -; dL/ds first/last 0.85; |g| growth x30; dead -; saturated 0.013; update lower/upper 0.17; |w| x1.2",
}

import torch
from torch import nn

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([2, 5, 5, 5, 5, 5, 1], "tanh", init="he_uniform", out_act="sigmoid")
    nn.init.normal_(model[-2].weight, 0.0, 0.05)
    opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.circles(), C.keras_bce, steps=600, bs=128, opt=opt)


if __name__ == "__main__":
    main()
