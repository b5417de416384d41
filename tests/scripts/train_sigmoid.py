"""A deep sigmoid net under plain SGD: the textbook vanishing gradient."""
import torch
from torch import nn

torch.manual_seed(0)
layers = []
for _ in range(8):
    layers += [nn.Linear(16, 16), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(16, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
for _ in range(60):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
