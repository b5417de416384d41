"""Non-finite: digits with a few missing pixels stored as NaN in the training data; the first
batch that contains one (step 20 in the fixed order) makes the loss and then every weight NaN."""
SCENARIO = {
    "name": "n_nan_in_input",
    "family": "mlp",
    "optimizer": "sgd",
    "expected": ["non_finite"],
    "allowed": [],
    "evidence": "measured: loss 2.38->-; acc 0.05->0.09; non-finite loss at step 20; grads at step 20; dL/ds first/last 0.28; |g| growth x1.3; dead 0; saturated -; update lower/upper 0.23; |w| x1",
}

import sys

import torch
from torch import nn

import _common as C


def main(healthy=False):
    torch.manual_seed(0)
    (x, y), (xe, ye) = C.digits()
    x = x.clone()
    if not healthy:  # healthy: the clean row, and Adam
        x[20 * 64 + 5, 10] = float("nan")  # one corrupt row, read by batch 20
    model = C.mlp([64, 128, 128, 10], "relu", init="he_uniform")
    if healthy:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn, losses = nn.CrossEntropyLoss(), []
    acc_init = C.accuracy(model, xe, ye)
    for start in list(range(0, len(x) - 63, 64)) * 2:
        loss = loss_fn(model(x[start:start + 64]), y[start:start + 64])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    C.report(losses, acc_init, C.accuracy(model, xe, ye), model=model, x=torch.nan_to_num(x))


if __name__ == "__main__":
    main(healthy="--healthy" in sys.argv)
