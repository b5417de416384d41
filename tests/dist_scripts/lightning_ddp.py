"""Lightning DDP on 2 CPU processes with GradwatchCallback: each rank's data differ, so its local
gradients differ from the averaged ones the optimizer applies. Rank 0 writes the norms it sees in
on_before_optimizer_step (after DDP's all-reduce) to OUT/applied.json."""
import json
import sys

import lightning.pytorch as pl
import torch
from torch import nn

from gradwatch.integrations.lightning import GradwatchCallback


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)
        self.applied = []

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.applied.append({n: float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])))
                             for n, m in (("fc1", self.fc1), ("fc2", self.fc2))})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(128, 8), torch.randn(128, 1))
    net = Net()
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=[GradwatchCallback(flush_every=4, sample_every=2)])
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=8))
    if trainer.global_rank == 0:
        with open(f"{out}/applied.json", "w") as fh:
            json.dump(net.applied, fh)
