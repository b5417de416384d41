"""AutoTrainer demo Improper_Activation_case: four Dense(50, relu, he_uniform) and a Dense(3,
relu) output under Keras categorical cross-entropy (outputs renormalised by their sum), Adam 1e-4,
batch 256. Poor accuracy, but (measured) none of the eight kinds: any finding is a false alarm."""
SCENARIO = {
    "name": "o_at_blob_improper_activation",
    "family": "mlp",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 8.51->5.39; acc 0.31->0.51; non-finite loss at step -; grads at step -; dL/ds first/last 0.23; |g| growth x2.8; dead 0.33; saturated -; update lower/upper 0.16; |w| x1",
}

import torch

import _common as C


def main():
    torch.manual_seed(0)
    model = C.mlp([2, 50, 50, 50, 50, 3], "relu", init="he_uniform", out_act="relu")
    C.keras_init_(model[-2].weight, "glorot_uniform")
    opt = C.keras_adam(model.parameters(), lr=1e-4)
    C.train(model, C.blobs(), C.keras_cce, steps=300, bs=256, opt=opt)


if __name__ == "__main__":
    main()
