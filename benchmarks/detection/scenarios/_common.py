"""Plain-PyTorch helpers shared by the scenarios: data, initialisers, a training loop.

Nothing here knows about gradwatch. Every scenario prints one line `RESULT {json}` at the end
with what the script itself saw (losses, first non-finite loss step, accuracy before and
after), which measure.py uses as label evidence alongside the recorded statistics.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, make_blobs, make_circles
from torch import nn

ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "linear": nn.Identity}


# ---------------------------------------------------------------- data (train, eval) pairs


def _split(x, y, n_train):
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def digits(shape="flat", size=8):
    """sklearn digits, shuffled once (seed 0): shape 'flat' (N,64), 'img' (N,1,size,size),
    'seq' (N,8,8: rows as time steps), 'flat784' (upsampled to 28x28, flattened)."""
    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))
    x = torch.tensor(d.data[perm], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[perm])
    if shape in ("img", "flat784"):
        x = x.reshape(-1, 1, 8, 8)
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if shape == "flat784":
            x = x.reshape(len(x), -1)
    elif shape == "seq":
        x = x.reshape(-1, 8, 8)
    return _split(x, y, 1400)


def blobs():
    """AutoTrainer's Blob data: make_blobs(1000, 3 centres, std 2, seed 2), 700/300, one-hot."""
    x, y = make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2, random_state=2)
    x = torch.tensor(x, dtype=torch.float32)
    y = F.one_hot(torch.tensor(y), 3).float()
    return _split(x, y, 700)


def circles():
    """AutoTrainer's Circle data: make_circles(1000, noise 0.1, seed 1), 700/300, 0/1 targets."""
    x, y = make_circles(n_samples=1000, noise=0.1, random_state=1)
    return _split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None], 700)


def cifar_like(n=800, size=16, classes=10, seed=0):
    """CIFAR-shaped synthetic images (N,3,size,size): a smooth random template per class plus
    noise, per-channel standardised as AutoTrainer's CIFAR pipeline does."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 0.8 * torch.randn(n, 3, size, size, generator=g)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return _split(x, y, n * 3 // 4)


def first_token_task(n=1000, T=50, d=4, seed=0):
    """Sequences (N,T,d) of noise; the label is the sign of x[:,0,0], so the answer at the last
    step depends only on the first step: a task that needs gradient through all T steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, d, generator=g)
    y = (x[:, 0, 0] > 0).long()
    return _split(x, y, n * 4 // 5)


def regression(n=1000, d=20, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w / math.sqrt(d) / scale + 0.1 * torch.randn(n, 1, generator=g)
    return _split(x, y, n * 4 // 5)


# ---------------------------------------------------------------- models and initialisers


def keras_init_(weight, name):
    """Keras 2.2 initialisers by alias (truncated normals use stddev sqrt(scale/fan)/0.8796)."""
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    if weight.dim() > 2:  # conv: fan counts include the receptive field
        fan_out = weight.shape[0] * weight[0, 0].numel()
    if name == "he_uniform":
        nn.init.kaiming_uniform_(weight, nonlinearity="relu")
    elif name == "glorot_uniform":
        nn.init.xavier_uniform_(weight)
    elif name in ("he_normal", "lecun_normal", "glorot_normal"):
        var = {"he_normal": 2.0 / fan_in, "lecun_normal": 1.0 / fan_in, "glorot_normal": 2.0 / (fan_in + fan_out)}[name]
        std = math.sqrt(var) / 0.87962566103423978
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
    elif name == "random_uniform":
        nn.init.uniform_(weight, -0.05, 0.05)
    elif name == "zeros":
        nn.init.zeros_(weight)
    elif name == "ones":
        nn.init.ones_(weight)
    else:
        raise ValueError(f"unknown initialiser {name!r}")


def mlp(sizes, act="relu", init=None, out_act=None, std=None, bias=0.0):
    """Linear layers of `sizes` with `act` between them (and `out_act` after the last).
    init: a Keras alias, 'normal' with `std`, or None for torch's default."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        if init == "normal":
            nn.init.normal_(lin.weight, 0.0, std)
        elif init is not None:
            keras_init_(lin.weight, init)
        if init is not None:
            nn.init.constant_(lin.bias, bias)
        layers.append(lin)
        last = i == len(sizes) - 2
        if not last:
            layers.append(ACTS[act]())
        elif out_act:
            layers.append(ACTS[out_act]())
    return nn.Sequential(*layers)


def small_cnn():
    """Two 3x3 ReLU convs, a max-pool and a linear head, for 8x8 digit images."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def ink_targets(data):
    """Replace the labels of a digits split by a regression target: total ink / 10."""
    (x, _), (xe, _) = data
    ink = lambda t: t.flatten(1).sum(1, keepdim=True) / 10
    return (x, ink(x)), (xe, ink(xe))


class SeqClassifier(nn.Module):
    """A recurrent layer (nn.RNN/GRU/LSTM) read out at the last time step."""

    def __init__(self, rnn, hidden, classes):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def keras_cce(p, y_onehot, eps=1e-7):
    """Keras categorical cross-entropy on probabilities: renormalise, clip, log."""
    p = p / p.sum(dim=1, keepdim=True)
    return -(y_onehot * torch.log(p.clamp(eps, 1 - eps))).sum(dim=1).mean()


def keras_bce(p, y, eps=1e-7):
    p = p.clamp(eps, 1 - eps)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


def keras_adam(params, lr=1e-3, betas=(0.9, 0.999)):
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=1e-7)


# ---------------------------------------------------------------- training and the RESULT line


@torch.no_grad()
def accuracy(model, x, y):
    """Accuracy on (x, y): y is 0/1 of shape (N,1) for one sigmoid output, one-hot, or labels."""
    out = model(x)
    if y.is_floating_point() and y.shape[-1] == 1:
        return float(((out > 0.5).float() == y).float().mean())
    if y.is_floating_point():
        y = y.argmax(1)
    return float((out.argmax(1) == y).float().mean())


@torch.no_grad()
def dead_fraction(model, x):
    """Largest fraction, over the ReLU modules and the F.relu of a TransformerEncoderLayer's
    feed-forward block (applied to `linear1`'s output), of units (features; channels of conv maps)
    that output 0 for every sample of x: measured on the whole set, not one batch."""
    fractions, handles = [], []

    def hook(module, args, out):
        out = torch.relu(out)  # (a ReLU module's output is its own)
        unit = 1 if out.dim() >= 4 else out.dim() - 1  # channels of conv maps, else features
        alive = (out != 0).movedim(unit, -1).reshape(-1, out.shape[unit]).any(dim=0)
        fractions.append(float((~alive).float().mean()))

    for m in model.modules():
        if isinstance(m, nn.ReLU):
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.TransformerEncoderLayer) and m.activation is nn.functional.relu:
            handles.append(m.linear1.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return max(fractions, default=None)


def report(losses, acc_init=None, acc_final=None, model=None, x=None, **extra):
    """Print the script's own view of the run as one line `RESULT {json}`: losses, accuracy, and
    with `model` whether any weight is non-finite at the end, with `x` the dead-unit fraction."""
    arr = np.array(losses, dtype=float)
    bad = np.flatnonzero(~np.isfinite(arr))
    finite = arr[np.isfinite(arr)]
    k = max(1, min(10, len(arr) // 10))
    out = {
        "steps": len(arr),
        "loss_first": float(np.mean(arr[:k])) if np.isfinite(arr[:k]).all() else None,
        "loss_last": float(np.mean(arr[-k:])) if np.isfinite(arr[-k:]).all() else None,
        "loss_min": float(finite.min()) if len(finite) else None,
        "loss_max": float(finite.max()) if len(finite) else None,
        "first_nonfinite_step": int(bad[0]) if len(bad) else None,
        "acc_init": acc_init,
        "acc_final": acc_final,
    }
    if model is not None:
        out["nonfinite_weights"] = not all(torch.isfinite(p).all() for p in model.parameters())
    if model is not None and x is not None:
        out["dead_full"] = dead_fraction(model, x)
    out.update(extra)
    print("RESULT " + json.dumps(out), flush=True)


def batches(n, bs, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (bs,), generator=g)


def train(model, data, loss_fn, *, steps, bs=64, opt=None, manual_lr=None, clip=None, sched=None,
          eval_data=None, params=None):
    """Minibatch training. With `opt` a torch optimizer steps; with `manual_lr` the update is
    written by hand (p.data -= lr * p.grad). `clip` is a max gradient norm. Prints RESULT."""
    (x, y), (xe, ye) = data
    params = list(params if params is not None else model.parameters())
    acc_init = accuracy(model, xe, ye) if eval_data is None else eval_data()
    losses = []
    for idx in batches(len(x), bs, steps):
        loss = loss_fn(model(x[idx]), y[idx])
        losses.append(loss.item())
        if opt is not None:
            opt.zero_grad()
        else:
            for p in params:
                p.grad = None
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.data -= manual_lr * p.grad
        if sched is not None:
            sched.step()
    acc_final = accuracy(model, xe, ye) if eval_data is None else eval_data()
    report(losses, acc_init, acc_final, model=model, x=x)
    return losses
