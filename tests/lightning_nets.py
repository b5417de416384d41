"""The LightningModules the Lightning tests train: apart, so that Lightning (6 s to import) is imported
when one of those tests runs, not by every pytest worker as it collects the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from gradwatch.integrations.lightning import GRAD_METRIC, GradwatchCallback  # noqa: F401 (for the tests)

CLIP = 0.01


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)
        self.preclip: list[dict[str, float]] = []
        self.postclip: list[float] = []

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer):  # Lightning: gradients not clipped yet
        self.preclip.append({name: float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in m.parameters(recurse=False)])))
            for name, m in self.named_modules() if list(m.parameters(recurse=False))})

    def on_train_batch_end(self, outputs, batch, i):
        pass

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.postclip.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()]))))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GAN(pl.LightningModule):
    """Lightning's manual-optimization GAN pattern (toggle_optimizer around each loss), with the
    gradients of 2 batches accumulated before each pair of steps."""

    def __init__(self, accumulate: int = 2):
        super().__init__()
        self.automatic_optimization = False
        self.accumulate = accumulate
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.g_norms: list[dict[str, float]] = []
        self.g_losses: list[float] = []
        self._window: list[torch.Tensor] = []

    def training_step(self, batch, i):
        opt_g, opt_d = self.optimizers()
        real, bce = batch[0], nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        self.toggle_optimizer(opt_g)
        fake = self.G(torch.randn(len(real), 4))
        g_loss = bce(self.D(fake), ones)
        self.manual_backward(g_loss / self.accumulate)
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = (bce(self.D(real), ones) + bce(self.D(fake.detach()), zeros)) / 2
        self.manual_backward(d_loss / self.accumulate)
        self.untoggle_optimizer(opt_d)
        self._window.append(g_loss.detach())
        if (i + 1) % self.accumulate == 0:
            self.g_norms.append({f"G.{k}": float(torch.cat([p.grad.flatten() for p in self.G[k].parameters()]).norm())
                                 for k in (0, 2)})
            self.g_losses.append(float(torch.stack(self._window).mean()))
            self._window = []
            for opt in (opt_g, opt_d):
                opt.step()
                opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.Adam(self.G.parameters(), 2e-3), torch.optim.Adam(self.D.parameters(), 2e-3)


class Accumulating(Net):
    """Net that keeps each step's micro-batch losses and the norms the optimizer is given."""

    def __init__(self):
        super().__init__()
        self.micro: list[float] = []
        self.step_losses: list[float] = []

    def training_step(self, batch, i):
        loss = super().training_step(batch, i)
        self.micro.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.step_losses.append(float(np.mean(self.micro)))
        self.micro = []


class FailingNet(Net):
    def training_step(self, batch, i):
        if self.global_step == 7:
            raise ValueError("bad batch at step 7")
        return super().training_step(batch, i)
