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


def double_mlp():
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()


class LateEmbedding(nn.Module):
    """A GPT-like model whose Embedding is not its first registered module."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 20)
        self.emb = nn.Embedding(20, 8)

    def forward(self, x):
        return self.head(self.emb(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.fc(a + b)


def segmenter():
    """N,C,H,W logits: 3 classes on dim 1, width 5 on the last dim."""
    return nn.Conv2d(2, 3, 1)


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, batch):
        return self.fc(batch["x"])


class GetInput(DictInput):
    def forward(self, batch):
        return self.fc(batch.get("x"))


def needs_args(width, depth=2):
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


class TinyAttention(nn.Module):
    """Token ids -> one post-LN encoder layer: MultiheadAttention checks its input's rank with an assert."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, ids):
        return self.enc(self.emb(ids))
