"""A tiny script using torch.optim; checks it runs as __main__ with its own argv."""
import sys

import torch
from torch import nn

assert __name__ == "__main__"
steps = int(sys.argv[1])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(steps):
    x = torch.randn(16, 4)
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"argv={sys.argv[1:]} final_loss={loss.item():.6f}")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
