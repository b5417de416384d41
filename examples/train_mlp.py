"""A plain PyTorch training script (knows nothing of gradwatch): a deep sigmoid MLP on digits.

Run it watched: gradwatch run examples/train_mlp.py --act sigmoid   (vanishing gradients)
                gradwatch run examples/train_mlp.py --act relu      (healthy, He init)
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--act", choices=["sigmoid", "relu"], default="sigmoid")
parser.add_argument("--depth", type=int, default=8)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--lr", type=float, default=0.1)
args = parser.parse_args()

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)

layers, width = [], 64
for _ in range(args.depth):
    linear = nn.Linear(width, 64)
    if args.act == "relu":
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
    layers += [linear, nn.Sigmoid() if args.act == "sigmoid" else nn.ReLU()]
    width = 64
model = nn.Sequential(*layers, nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
loss_fn = nn.CrossEntropyLoss()

for step in range(args.steps):
    idx = torch.randint(0, len(x), (64,))
    loss = loss_fn(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step} loss {loss.item():.4f}")
accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"accuracy {accuracy:.3f}")
