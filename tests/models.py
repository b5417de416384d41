"""Small models of the four families the watch must handle, with matching random batches."""

import torch
from torch import nn


class LSTMLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0])


class Transformer(nn.Module):
    def __init__(self, dim=16, classes=5):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(1))


def make(family: str):
    """(model, batch_fn(step) -> (x, y), loss_fn) for one family; seeded."""
    torch.manual_seed(0)
    if family == "mlp":
        model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 32), nn.Sigmoid(), nn.Linear(32, 4))
        batch = lambda g: (torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
        return model, batch, nn.CrossEntropyLoss()
    if family == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
        batch = lambda g: (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
        return model, batch, nn.CrossEntropyLoss()
    if family == "lstm":
        model = LSTMLM()
        def batch(g):
            seq = torch.randint(0, 50, (4, 11), generator=g)
            return seq[:, :-1], seq[:, 1:]
        ce = nn.CrossEntropyLoss()
        return model, batch, lambda out, y: ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if family == "transformer":
        model = Transformer()
        batch = lambda g: (torch.randn(4, 6, 8, generator=g), torch.randint(0, 5, (4,), generator=g))
        return model, batch, nn.CrossEntropyLoss()
    raise ValueError(family)


FAMILIES = ("mlp", "cnn", "lstm", "transformer")


def train(family: str, optimizer: str, steps: int, watch_kwargs=None, on_step=None):
    """Train a seeded model; returns (losses, model, watch or None)."""
    import gradwatch

    model, batch, loss_fn = make(family)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    watch = gradwatch.watch(model, opt, **watch_kwargs) if watch_kwargs is not None else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x, y = batch(g)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if on_step is not None:
            on_step(step, model)
        opt.step()
        losses.append(loss.detach().clone())
    if watch is not None:
        watch.detach()
    return losses, model, watch
