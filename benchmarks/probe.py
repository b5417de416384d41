"""Cost of `gradwatch probe` relative to one training step of the same model.

Targets (issue 5): the gradient profile (iters=0: one forward + one backward with hooks)
≤ 3 training steps; the Jacobian spectra ≤ iters × 2 forward-backward equivalents. A training step
is forward + backward + SGD step, median of several; the probe times are medians too.

    python benchmarks/probe.py [--iters 30] [--repeats 3] [--only resnet]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradwatch.probe import probe  # noqa: E402
from models import TransformerClassifier  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


def resnet18_like(width=32, classes=10):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, 20 convs + fc) at half width, for 32x32."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for i, w in enumerate(widths):
        layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def workloads():
    torch.manual_seed(0)
    yield "ResNet-18-like CNN (width 32, 16×3×32×32)", resnet18_like(), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    # benchmarks/models.py's 6-layer transformer (d=256, 4 heads, seq 64), dropout as configured (0.1)
    yield "6-layer transformer (d=256, 16×64 tokens)", TransformerClassifier(), torch.randint(0, 1000, (16, 64)), torch.randint(0, 10, (16,))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), iters={args.iters}\n")
    print("| model | train step | gradient profile | × step (target ≤ 3) | spectra | fwd-bwd equivalents (target ≤ "
          f"{2 * args.iters}) | layers |")
    print("|---|---|---|---|---|---|---|")
    for name, model, x, y in workloads():
        if args.only and args.only.lower() not in name.lower():
            continue
        loss_fn = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad()
            loss_fn(model(x)).backward()
            opt.step()

        step()  # warm-up
        opt.zero_grad(set_to_none=True)
        # Interleaved rounds (step, profile, step, spectra): load on a shared machine cancels in the ratios.
        grad_ratio, spec_ratio, t_steps, t_grads, t_specs, result = [], [], [], [], [], None
        for _ in range(args.repeats):
            t_step = median_time(step, 3)
            t_grad = median_time(lambda: probe(model, x, loss_fn, iters=0), 1)
            t_step2 = median_time(step, 3)
            t0 = time.perf_counter()
            result = probe(model, x, loss_fn, iters=args.iters)
            t_spec = time.perf_counter() - t0 - t_grad
            ref = (t_step + t_step2) / 2
            grad_ratio.append(t_grad / ref)
            spec_ratio.append(t_spec / ref)
            t_steps.append(ref), t_grads.append(t_grad), t_specs.append(t_spec)
        med = statistics.median
        print(f"| {name} | {med(t_steps) * 1e3:.0f} ms | {med(t_grads) * 1e3:.0f} ms | {med(grad_ratio):.2f} | "
              f"{med(t_specs):.2f} s | {med(spec_ratio):.1f} | {len(result.layers)} |")


if __name__ == "__main__":
    main()
