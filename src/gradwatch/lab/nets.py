"""The lab's networks: MLPs with a chosen nonlinearity, initialisation, batch norm or residual
blocks, and small recurrent regressors. Modules are named (fc1, act1, ...) so pages and watched
layers read naturally."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from gradwatch.errors import ConfigError

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softsign": nn.Softsign,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
}


def _uniform(w: torch.Tensor, bound: float) -> None:
    nn.init.uniform_(w, -bound, bound)


# Each initialiser sets one Linear weight (shape out x in); biases are set to zero.
INITS = {
    # Glorot & Bengio (2010) eq. 1, the "standard" heuristic: U[-1/sqrt(n_in), 1/sqrt(n_in)].
    "standard": lambda w: _uniform(w, 1.0 / math.sqrt(w.shape[1])),
    # Glorot & Bengio (2010) eq. 16, "normalized" = Xavier: U[-sqrt(6/(n_in+n_out)), +].
    "xavier": lambda w: nn.init.xavier_uniform_(w),
    "xavier_normal": lambda w: nn.init.xavier_normal_(w),
    # He et al. (2015): N(0, 2/n_in), for ReLU.
    "he": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    # LeCun: N(0, 1/n_in), for SELU (Klambauer et al. 2017).
    "lecun": lambda w: nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[1])),
    "zeros": lambda w: nn.init.zeros_(w),
    # every weight 1/n_in: each unit averages its inputs, so all units of a layer are identical
    "constant": lambda w: nn.init.constant_(w, 1.0 / w.shape[1]),
    "normal": lambda w: nn.init.normal_(w, 0.0, 1.0),
    "small": lambda w: nn.init.normal_(w, 0.0, 0.01),
    "torch": lambda w: None,  # torch's own default (kaiming_uniform with a=sqrt(5))
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def init_linear(linear: nn.Linear, init: str) -> None:
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {sorted(INITS)}")
    if init != "torch":
        INITS[init](linear.weight.data)
        nn.init.zeros_(linear.bias)


class Residual(nn.Module):
    """y = act(x + BN(W2 act(BN(W1 x)))): the basic block of He et al. (2016), fully connected."""

    def __init__(self, width: int, act: str, init: str):
        super().__init__()
        self.fc1, self.bn1, self.act1 = nn.Linear(width, width), nn.BatchNorm1d(width), activation(act)
        self.fc2, self.bn2, self.act2 = nn.Linear(width, width), nn.BatchNorm1d(width), activation(act)
        init_linear(self.fc1, init)
        init_linear(self.fc2, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x + self.bn2(self.fc2(self.act1(self.bn1(self.fc1(x))))))


def mlp(n_in: int, width: int, depth: int, n_out: int, act: str = "relu", init: str = "he",
        bn: bool = False, residual: bool = False) -> nn.Sequential:
    """`depth` hidden layers of `width` units, then a linear output layer. With `residual`, the
    hidden layers after the first come in blocks of two (depth - 1 must be even)."""
    if depth < 1 or width < 1:
        raise ConfigError(f"depth={depth}, width={width}: both must be >= 1")
    layers: list[tuple[str, nn.Module]] = []

    def hidden(i: int, fan_in: int) -> None:
        fc = nn.Linear(fan_in, width)
        init_linear(fc, init)
        layers.append((f"fc{i}", fc))
        if bn:
            layers.append((f"bn{i}", nn.BatchNorm1d(width)))
        layers.append((f"act{i}", activation(act)))

    hidden(1, n_in)
    if residual:
        if (depth - 1) % 2:
            raise ConfigError(f"residual depth={depth}: depth - 1 must be even (blocks of two layers)")
        for b in range((depth - 1) // 2):
            layers.append((f"block{b + 1}", Residual(width, act, init)))
    else:
        for i in range(2, depth + 1):
            hidden(i, width)
    out = nn.Linear(width, n_out)
    init_linear(out, "xavier" if init in ("zeros", "constant", "normal", "torch") else init)
    if init == "zeros":
        init_linear(out, "zeros")
    if init == "constant":  # one random column for every hidden unit: the classes differ, the units do not
        out.weight.data[:] = out.weight.data[:, :1]
    layers.append(("out", out))
    return nn.Sequential(OrderedDict(layers))


class SequenceRegressor(nn.Module):
    """A recurrent layer (tanh RNN, LSTM or GRU) read out at the last time step."""

    def __init__(self, cell: str, hidden: int, n_in: int = 2):
        super().__init__()
        kinds = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in kinds:
            raise ConfigError(f"unknown recurrent cell {cell!r}; expected one of {sorted(kinds)}")
        self.rnn = kinds[cell](n_in, hidden)
        self.head = nn.Linear(hidden, 1)
        if cell == "lstm":  # forget gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015)
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    p.data[hidden:2 * hidden] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return self.head(out[-1]).squeeze(-1)
