"""Healthy: 16 pre-LayerNorm residual ReLU blocks (32 linear layers deep), Adam."""
SCENARIO = {
    "name": "h_mlp_residual_deep",
    "family": "mlp",
    "optimizer": "adam",
    "expected": [],
    "allowed": [],
    "evidence": "measured: loss 2.36->0.0237; acc 0.12->0.97; non-finite loss at step -; grads at step -; dL/ds first/last 7.1; |g| growth x2.9; dead 0.016; saturated -; update lower/upper 0.085; |w| x1",
}

import torch
from torch import nn

import _common as C


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), *[Block(64) for _ in range(16)], nn.LayerNorm(64), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    C.train(model, C.digits(), nn.CrossEntropyLoss(), steps=250, opt=opt)


if __name__ == "__main__":
    main()
