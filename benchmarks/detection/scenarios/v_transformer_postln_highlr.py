"""Vanishing: a post-LayerNorm TransformerEncoder (4 layers) with Adam lr 0.02 and no warm-up: the
early large updates collapse it, after which almost no gradient reaches the embedding; 81% of a
feed-forward block's F.relu units are then 0 for every training sample (the script's own check)."""
SCENARIO = {
    "name": "v_transformer_postln_highlr",
    "family": "transformer",
    "optimizer": "adam",
    "expected": ["vanishing_gradient"],
    "allowed": ["stalled_layers", "dead_units"],
    "evidence": "measured: loss 2.58->2.31; acc 0.10->0.11; non-finite loss at step -; grads at step -; dL/ds first/last 8.3e-08; |g| growth x2; dead 0.81; saturated -; update lower/upper 4.2e-05; |w| x1.3",
}

import sys

import torch
from torch import nn

import _common as C
from h_transformer_warmup import RowTransformer


def main(healthy=False):
    torch.manual_seed(0)
    model = RowTransformer(d=32, layers=4, norm_first=healthy)  # healthy: pre-LN, Adam at 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if healthy else 0.02)
    C.train(model, C.digits("seq"), nn.CrossEntropyLoss(), steps=300, opt=opt)


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
