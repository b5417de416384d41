"""Model factories for the `gradwatch probe` CLI tests (importable as test_probe_helpers:NAME)."""

from torch import nn


def sigmoid_mlp():
    return nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(32, 32), nn.Sigmoid())], nn.Linear(32, 10))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = nn.RNN(16, 16, batch_first=True)
        self.head = nn.Linear(16, 50)

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def no_layers():
    return nn.Sequential(nn.ReLU(), nn.Identity())


def broken():
    raise RuntimeError("cannot build")
