"""The four benchmark workloads at realistic CPU sizes: (model, optimizer, batch) factories."""

import torch
from torch import nn


def deep_mlp():
    layers = []
    for _ in range(8):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), *layers, nn.Linear(512, 10))
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    return model, (x, y), nn.CrossEntropyLoss()


def small_cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, 10),
    )
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, (x, y), nn.CrossEntropyLoss()


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab=2000, dim=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0]).flatten(0, 1)


def lstm_lm():
    seq = torch.randint(0, 2000, (32, 36))
    return LSTMLanguageModel(), (seq[:, :-1], seq[:, 1:].flatten()), nn.CrossEntropyLoss()


class TransformerClassifier(nn.Module):
    def __init__(self, dim=256):
        super().__init__()
        self.emb = nn.Embedding(1000, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


def transformer():
    return TransformerClassifier(), (torch.randint(0, 1000, (16, 64)), torch.randint(0, 10, (16,))), nn.CrossEntropyLoss()


WORKLOADS = {"deep_mlp": deep_mlp, "small_cnn": small_cnn, "lstm_lm": lstm_lm, "transformer": transformer}
