"""AutoTrainer demo Gradient_Vanish_Case (author-labelled vanishing): eight sigmoid Dense(5)
he_uniform + Dense(1, sigmoid) on Circle, Adam 1e-3, batch 128, binary cross-entropy."""
SCENARIO = {
    "name": "v_at_circle_sigmoid_demo",
    "family": "mlp",
    "optimizer": "adam",
    "expected": ["vanishing_gradient"],
    "allowed": ["loss_plateau"],
    "evidence": "measured: loss 0.727->0.693; acc 0.50->0.50; non-finite loss at step -; grads at step -; dL/ds first/last 3.3e-06; |g| growth x1.2; dead -; saturated 0; update lower/upper 0.64; |w| x1",
}

import sys

import torch

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    act = "relu" if healthy else "sigmoid"  # healthy: ReLU hidden layers (He init already)
    model = C.mlp([2] + [5] * 8 + [1], act, init="he_uniform", out_act="sigmoid")
    opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.circles(), C.keras_bce, steps=600, bs=128, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
