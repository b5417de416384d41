"""The lab's data: scikit-learn's digits (shipped with scikit-learn, nothing downloaded) and the
adding problem (synthetic). A `Task` draws its training batches from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gradwatch.errors import ConfigError

# The adding problem's target is the sum of the two marked values, each U[0, 1]. The best constant
# predictor is the mean, 1.0; its MSE is Var(X1 + X2) = 2 * (1/12) = 1/6. (Hochreiter & Schmidhuber
# 1997 draw values from U[-1, 1] and use the target 0.5 + (X1 + X2) / 4, whose variance is
# (2/3) / 16 = 1/24 ~ 0.042: that is the "0.042" often quoted; the scaling differs, not the task.)
ADDING_BASELINE_MSE = 1.0 / 6.0


@dataclass
class Task:
    """A supervised task: a fixed test set and a function drawing a training batch."""

    name: str
    loss: str  # "ce" (classification, integer labels) or "mse" (regression)
    x_test: torch.Tensor
    y_test: torch.Tensor
    draw: Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
    n_in: int
    n_out: int

    def batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.draw(gen, size)


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a dev extra, not a core dependency
        raise ConfigError(
            "the lab's digits experiments need scikit-learn (its digits data ship with it, nothing "
            "is downloaded); install it: pip install scikit-learn"
        ) from exc
    return load_digits()


_DIGITS: dict[int, tuple] = {}


def digits(n_test: int = 497, seed: int = 0) -> Task:
    """The 1797 8x8 digits, standardised with the training split's statistics; a seeded split of
    1300 training and 497 test images; training batches are drawn with replacement."""
    if seed not in _DIGITS:
        d = _load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.int64)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        test, train = order[:n_test], order[n_test:]
        mean, std = x[train].mean(0), x[train].std(0)
        std[std == 0] = 1.0  # constant border pixels
        x = (x - mean) / std
        _DIGITS[seed] = (x[train], y[train], x[test], y[test])
    x_train, y_train, x_test, y_test = _DIGITS[seed]

    def draw(gen: torch.Generator, size: int):
        idx = torch.randint(0, len(x_train), (size,), generator=gen)
        return x_train[idx], y_train[idx]

    return Task("digits", "ce", x_test, y_test, draw, n_in=64, n_out=10)


def adding_batch(gen: torch.Generator, size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adding problem (Hochreiter & Schmidhuber 1997): a sequence of (value, marker) pairs, values
    U[0, 1], one marker in the first half and one in the second; the target is the sum of the two
    marked values. Shape (length, size, 2), sequence first."""
    values = torch.rand(length, size, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (size,), generator=gen)
    second = torch.randint(half, length, (size,), generator=gen)
    marks = torch.zeros(length, size)
    cols = torch.arange(size)
    marks[first, cols] = 1.0
    marks[second, cols] = 1.0
    target = values[first, cols] + values[second, cols]
    return torch.stack([values, marks], dim=-1), target


def adding(length: int, n_test: int = 1000, seed: int = 1) -> Task:
    x_test, y_test = adding_batch(torch.Generator().manual_seed(seed), n_test, length)
    return Task(f"adding T={length}", "mse", x_test, y_test,
                lambda gen, size: adding_batch(gen, size, length), n_in=2, n_out=1)
