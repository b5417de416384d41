"""AutoTrainer port dd:blob:model_2569b90f: eleven sigmoid Dense(5) he_uniform + Dense(3, sigmoid)
on Blob under Keras categorical cross-entropy (renormalised), Adam 1e-3, batch 256."""
SCENARIO = {
    "name": "v_at_blob_sigmoid11",
    "family": "mlp",
    "optimizer": "adam",
    "expected": ["vanishing_gradient"],
    "allowed": ["loss_plateau"],
    "evidence": "measured: loss 1.1->1.1; acc 0.36->0.31; non-finite loss at step -; grads at step -; dL/ds first/last 1.6e-06; |g| growth x1.9; dead -; saturated 0.28; update lower/upper 0.98; |w| x1.1",
}

import sys

import torch

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    act = "relu" if healthy else "sigmoid"  # healthy: ReLU hidden layers (He init already)
    model = C.mlp([2] + [5] * 11 + [3], act, init="he_uniform", out_act="sigmoid")
    opt = C.keras_adam(model.parameters(), lr=1e-3)
    C.train(model, C.blobs(), C.keras_cce, steps=600, bs=256, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
