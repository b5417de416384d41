"""A ReLU MLP under SGD with a learning rate too high for it: the gradients explode into NaN."""
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(64, 16)
y = x.sum(1, keepdim=True)
for step in range(80):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
print(f"final loss {loss.item():.4g}")
